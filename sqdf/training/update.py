"""Applying the update: the scheduled learning rate, one all-reduce of what the processes
counted, gradients averaged and clipped, the optimizer step or a skip, the moving average,
and the update's metrics row."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from sqdf.config.train_config import TrainConfig
from sqdf.errors import DivergedError
from sqdf.infra.distributed import Processes, average_gradients
from sqdf.methods import METHODS
from sqdf.rewards.mixture import WeightedReward
from sqdf.run.folder import append_metrics
from sqdf.training.state import Fresh, Gradients, TrainingRun


def set_learning_rate(s: TrainingRun, update: int) -> None:
    """Every parameter group at update ``update``'s scheduled rate, before its step: a pure
    function of the update, so a resumed run (whose optimizer state holds the rate of the
    checkpoint's last update) continues the schedule exactly. A skipped update keeps its place."""
    lr = scheduled_lr(s.cfg, update)
    for group in s.optimizer.param_groups:
        group["lr"] = lr


def scheduled_lr(cfg: TrainConfig, update: int) -> float:
    """The learning rate of update ``update`` (counted from 0) of a ``cfg.steps``-update run.

    With w = lr_warmup and progress p = (update - w) / (steps - w) in [0, 1]:
    warm-up lr * update / w while update < w (as diffusers' and transformers' schedules,
    whose first warm-up update is made at 0), then lr_min + (lr - lr_min) * s(p) with
    s = 1 (constant, which has no lr_min), (1 + cos(pi p)) / 2 (cosine) or 1 - p (linear);
    p = 1, after the last update, is lr_min.
    """
    w, total = cfg.lr_warmup, cfg.steps
    if update < w:
        return cfg.lr * update / w
    if cfg.lr_schedule == "constant":
        return cfg.lr
    p = min((update - w) / (total - w), 1.0)  # config: w < steps
    shape = (1 + math.cos(math.pi * p)) / 2 if cfg.lr_schedule == "cosine" else 1 - p
    return cfg.lr_min + (cfg.lr - cfg.lr_min) * shape


def count_update(s: TrainingRun, fresh: Fresh, grads: Gradients) -> torch.Tensor:
    """One small all-reduce of what every process counted (samples, rewards, skips) into the
    run's counters; a skip anywhere skips the update everywhere. Returns the summed tally:
    bad, sampled, method evals, skips, reward sum, sum of squares, count, partial, then each
    mixture component's sum and count (``reward_part_names``)."""
    r, own = fresh.rewards, fresh.parts
    if s.cfg.buffer_scope == "shared" and not s.procs.is_main:
        # every process holds the same union: counted once (the main process's), not once a
        # process, so the reward's count, and the n - 1 of its std, are the union's
        r, own = r[:0], {}
    parts = [own.get(name, r[:0]) for name in reward_part_names(s)]
    tally = s.procs.sum(torch.tensor([
        fresh.bad, fresh.sampled, grads.method_evals, float(grads.skip), r.sum(), (r**2).sum(),
        r.numel(), grads.partial, *[v for p in parts for v in (p.sum(), p.numel())],
    ], dtype=torch.float64))  # fmt: skip
    bad, sampled, method_evals = int(tally[0]), int(tally[1]), int(tally[2])
    s.counters["nonfinite_rewards"] += bad
    s.counters["samples_seen"] += sampled + int(tally[7])
    s.counters["reward_evals"] += sampled + method_evals
    if tally[3] > 0 and not grads.skip:
        grads.skip, grads.cause = True, "another process skipped this update"
    return tally


def reward_part_names(s: TrainingRun) -> list[str]:
    """The components of the trained reward, if it is a mixture (logged one by one)."""
    reward = s.task.reward_model
    return list(reward.weights) if isinstance(reward, WeightedReward) else []


def reward_part_means(s: TrainingRun, tally: torch.Tensor) -> dict[str, float]:
    """``reward_NAME_mean`` of each mixture component over the processes' newest batches,
    from :func:`count_update`'s tally: NaN before the first fresh batch is stored, and after a
    resume until the next one (the components are not checkpointed; the total is)."""
    out = {}
    for i, name in enumerate(reward_part_names(s)):
        total, count = float(tally[8 + 2 * i]), float(tally[9 + 2 * i])
        out[f"reward_{name}_mean"] = total / count if count else math.nan
    return out


def apply_update(s: TrainingRun, grads: Gradients, tally: torch.Tensor) -> float:
    """Average and clip the gradients and step the optimizer, unless the update is skipped
    (then the weights stay as they were); too many skips in a row stop the run. Returns the
    gradient norm before clipping (NaN when skipped before it was taken)."""
    cfg, scaler = s.cfg, s.scaler
    grad_norm = math.nan
    unscaled = False
    if not grads.skip:
        unscale = None
        if scaler is not None:
            unscale = lambda: scaler.unscale_(s.optimizer)  # noqa: E731
        grad_norm = average_and_clip(s.procs, s.params, cfg.max_grad_norm, unscale)
        unscaled = scaler is not None
        if not math.isfinite(grad_norm):
            grads.skip, grads.cause = True, f"the gradient norm was {grad_norm}"
            if scaler is not None:
                grads.cause += f" at loss scale {scaler.get_scale():g} (float16 overflow)"
    if grads.skip:
        s.optimizer.zero_grad(set_to_none=True)
        s.counters["skipped_updates"] += 1
        s.consecutive_skips += 1
        if s.consecutive_skips >= cfg.max_skips:
            raise DivergedError(
                f"stopped after {s.consecutive_skips} consecutive updates skipped for "
                f"non-finite values: {grads.cause} (the weights were not changed by them)"
            )
    elif scaler is not None:
        scaler.step(s.optimizer)  # the gradients are finite: it steps
        s.consecutive_skips = 0
    else:
        s.optimizer.step()
        s.consecutive_skips = 0
    if s.ema is not None and not grads.skip:
        s.counters["ema_updates"] += 1
        decay = ema_decay_at(cfg.ema_decay, int(s.counters["ema_updates"]))
        with torch.no_grad():  # ema <- decay * ema + (1 - decay) * weights
            torch._foreach_lerp_(s.ema, [p.detach() for p in s.params], 1.0 - decay)
    if unscaled:
        scaler.update()  # halves the scale after an overflow, grows it after a run
    return grad_norm


def average_and_clip(
    procs: Processes,
    params: list[torch.nn.Parameter],
    max_norm: float,
    unscale: Callable[[], None] | None = None,
) -> float:
    """Average the gradients over processes (FSDP has done it in the backward), undo a loss
    scale (``unscale``, after the average so that every process sees the same gradients and
    its loss scaler decides as the others do), clip them to ``max_norm`` (0 = no clipping)
    and return their norm before clipping, the same in every process."""
    if not procs.fsdp:
        average_gradients(procs, params)
    if unscale is not None:
        unscale()
    return procs.clip(params, max_norm)


def ema_decay_at(decay: float, updates: int) -> float:
    """The average's decay after ``updates`` optimizer steps: ``decay``, warmed up as
    diffusers' EMAModel does, min(decay, (1 + t) / (10 + t)), so that an early average is not
    mostly the pretrained weights (at 0.999 without it, 74 % of the average after 300
    updates would still be the starting policy)."""
    return min(decay, (1 + updates) / (10 + updates))


@contextmanager
def ema_weights(s: TrainingRun) -> Iterator[None]:
    """The policy with its moving-average weights in place of the trained ones (a task's
    save_final reads the network itself), the trained ones back after."""
    assert s.ema is not None
    # one tensor at a time: FSDP's sharded parameters have no fused copy; the trained
    # weights wait on the CPU, not beside two copies of themselves on the GPU
    trained = [p.detach().to("cpu", copy=True) for p in s.params]
    with torch.no_grad():
        for p, e in zip(s.params, s.ema, strict=True):
            p.detach().copy_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, t in zip(s.params, trained, strict=True):
                p.detach().copy_(t)


def log_update(
    s: TrainingRun, done: int, grads: Gradients, tally: torch.Tensor, grad_norm: float
) -> dict[str, Any]:
    """The metrics row of update ``done`` (averaged over processes), appended to
    metrics.jsonl by the main process."""
    procs = s.procs
    loss = grads.loss
    if procs.world > 1:
        loss = float(procs.mean(torch.tensor(loss)))
    stats = mean_stats(procs, METHODS[s.cfg.method].stats, grads.stats)
    n, total, squares = float(tally[6]), float(tally[4]), float(tally[5])
    mean = total / n if n else math.nan
    var = (squares - n * mean * mean) / (n - 1) if n > 1 else 0.0
    row = {
        "step": done,
        "loss": loss if not grads.skip else math.nan,
        "reward_mean": mean,
        "reward_std": math.sqrt(max(var, 0.0)),
        **reward_part_means(s, tally),
        **stats,
        "grad_norm": grad_norm,
        "lr": s.optimizer.param_groups[0]["lr"],
        "samples_seen": s.counters["samples_seen"],
        "reward_evals": s.counters["reward_evals"],
        "skipped_updates": s.counters["skipped_updates"],
        "nonfinite_rewards": s.counters["nonfinite_rewards"],
        "wall_s": round(time.perf_counter() - s.t0, 3),
        "sample_s": round(s.counters["sample_s"], 6),  # of wall_s, this process's
    }
    if procs.is_main:
        append_metrics(s.run, row)
        if s.trackers is not None:
            s.trackers.log(row, done)
    return row


def mean_stats(procs: Processes, keys: tuple[str, ...], stats: dict[str, float]) -> dict:
    """Each of a method's ``keys`` averaged over the processes that computed it (NaN where
    none did: every process skipped its loss); one fixed-size all-reduce, the same in every
    process whichever of them skipped."""
    undeclared = set(stats) - set(keys)
    if undeclared:  # a method's loss and its declaration disagree: a bug, not bad input
        raise RuntimeError(f"the loss reported {sorted(undeclared)}, not in its Method.stats")
    pairs = [[stats[k], 1.0] if k in stats else [0.0, 0.0] for k in keys]
    totals = procs.sum(torch.tensor(pairs, dtype=torch.float64).reshape(len(keys), 2))
    return {k: s / n if n else math.nan for k, (s, n) in zip(keys, totals.tolist(), strict=True)}
