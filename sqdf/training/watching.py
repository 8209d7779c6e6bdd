"""What a run shows while it trains: the --sample-every pictures and the --eval-every
evaluation, each from its own random state so that the run trains as it would without them."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from sqdf.evaluation.periodic_eval import PeriodicEval
from sqdf.run.folder import EVAL_METRICS, append_metrics
from sqdf.sampling.sampler import samples_from_seed
from sqdf.tasks import resolved_reward_name
from sqdf.training.state import TrainingRun
from sqdf.training.update import ema_weights

PICTURE_SEED = 20_251_204  # the noise and conditions of every --sample-every picture


def save_pictures(s: TrainingRun, done: int) -> None:
    """Policy beside reference samples at update ``done``, from the same fixed noise and
    conditions at every update (and on resume), as RUN/samples/step_NNNNNNN.png and to the
    trackers. Its own generators: the run's stream, and so its result, is not touched.
    Every process samples (FSDP needs them all in the forward); the main one writes."""
    s.phase = "pictures"
    with own_random_state(s):
        _draw_pictures(s, done)


def _draw_pictures(s: TrainingRun, done: int) -> None:
    task, n = s.task, s.task.picture_samples
    if s.picture_reference is None:
        s.picture_reference = samples_from_seed(task, n, PICTURE_SEED, policy=False)
    cond, ref = s.picture_reference
    _, x0 = samples_from_seed(task, n, PICTURE_SEED, cond=cond)
    if s.procs.is_main:
        path = s.run / "samples" / f"step_{done:07d}.png"
        path.parent.mkdir(exist_ok=True)
        task.plot_samples(x0, ref, cond, path)
        if s.trackers is not None:
            s.trackers.log_image("samples", path, done)


def own_random_state(s: TrainingRun) -> Any:
    """The global torch generators saved and restored around work that is not training
    (pictures, evaluation): a reward, an evaluator or a module built there may draw from
    them, and the run must train as it would without that work."""
    devices = [s.task.device] if s.task.device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def log_evaluation(s: TrainingRun, done: int) -> None:
    """The --eval-every evaluation at update ``done`` (of the moving average where the run
    keeps one, as sqdf eval scores it) into RUN/eval_metrics.jsonl and, as eval/NAME, the
    trackers. Every process samples (FSDP needs them all); the main one writes."""
    s.phase = "evaluation"
    if s.evaluation is None:
        s.evaluation = PeriodicEval(s.task, resolved_reward_name(s.cfg))
    with own_random_state(s), ema_weights(s) if s.ema is not None else nullcontext():
        row = {"step": done, **s.evaluation()}
    if s.procs.is_main:
        append_metrics(s.run, row, EVAL_METRICS)
        if s.trackers is not None:
            s.trackers.log({f"eval/{k}": v for k, v in row.items() if k != "step"}, done)
