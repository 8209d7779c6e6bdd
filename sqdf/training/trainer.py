"""The one training loop every method shares.

Per update: (every ``replay_ratio`` updates) sample a fresh batch of trajectories without
gradients and store it in the replay buffer; draw ``grad_accum`` micro-batches of
(trajectory, step) cells; accumulate the method's loss; clip; AdamW step; log; checkpoint.
With ``rollout = "truncated"`` there is no buffer: each micro-batch is a fresh batch of
trajectories run only as far as the steps its cells use.

``train`` reads as its phases, a module of sqdf.training each: ``start.set_up`` (folder,
config, task, optimizer, buffer, resume), then per update ``fresh.sample_fresh``,
``gradients.accumulate_gradients`` (micro-batches from ``draw_cells``),
``update.count_update`` (one all-reduce of the counters), ``update.apply_update`` (clip,
skip or step) and ``update.log_update``, the pictures and evaluation of ``watching``, and
``saving.checkpoint``; ``saving.finish`` writes RUN/final. ``state`` holds what the phases
hand on.

Non-finite values never reach the weights: fresh samples with a non-finite reward are not
stored, and an update whose loss or gradient is not finite is skipped (and counted). After
``max_skips`` consecutive skips the run stops with a message naming the cause.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from sqdf.config.train_config import TrainConfig
from sqdf.errors import SqdfError
from sqdf.infra.atomic import folder_writes
from sqdf.infra.preemption import Preempted, agreed_signal, signal_name, stop_on_signals
from sqdf.training.fresh import sample_fresh
from sqdf.training.gradients import accumulate_gradients
from sqdf.training.saving import checkpoint, continue_note, finish
from sqdf.training.start import check_free_space, set_up, stop_before_training
from sqdf.training.state import TrainingRun, TrainState
from sqdf.training.update import apply_update, count_update, log_update, set_learning_rate
from sqdf.training.watching import log_evaluation, save_pictures


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    state: TrainState | None = None,
    sources: dict[str, str] | None = None,
    command: str | None = None,
) -> Path:
    """Fine-tune ``cfg.task``'s model with ``cfg.method``; returns the run folder.

    With ``resume=True``, ``out`` must be an earlier run of the same config: training goes
    on from its latest valid checkpoint and gives the same result as an uninterrupted run.
    With ``state``, the task, optimizer, buffer and generator are the caller's and stay
    there (no resume: the caller checkpoints them). Under ``accelerate launch`` or
    ``torchrun`` every process runs this (sqdf.infra.distributed). ``sources`` says where each
    setting came from (sqdf.run.settings), for config.json; ``command``, the command line that
    started it, for final/README.md (sqdf.run.model_card).
    """
    run = Path(out)
    # a caller (sqdf bbo) keeps its own checkpoints and says how to go on
    again = (lambda: "") if state is not None else (lambda: continue_note(run))
    with stop_on_signals(), folder_writes(run, again):
        s = set_up(cfg, run, resume=resume, progress=progress, state=state, sources=sources)
        s.last_checkpoint = s.start if s.start else -1  # a resumed run starts at its checkpoint
        check_free_space(s)
        stop_before_training(s)
        run_updates(s, progress)
        return finish(s, command)


def run_updates(s: TrainingRun, progress: bool) -> None:
    """Updates ``s.start`` to ``steps``, each in its phases, with its log row, pictures,
    evaluation and checkpoint as the config asks, and a stop where a signal asked for one."""
    bar = tqdm(
        range(s.start, s.cfg.steps), initial=s.start, total=s.cfg.steps,
        disable=not (progress and s.procs.is_main), desc=f"{s.cfg.method} on {s.cfg.task}",
        dynamic_ncols=True,
    )  # fmt: skip
    step = s.start
    try:
        for step in bar:
            set_learning_rate(s, step)
            fresh = sample_fresh(s, step)
            grads = accumulate_gradients(s, fresh)
            tally = count_update(s, fresh, grads)
            grad_norm = apply_update(s, grads, tally)
            done = step + 1
            if done % s.cfg.log_every == 0 or done == s.cfg.steps:
                row = log_update(s, done, grads, tally, grad_norm)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl_mean']:.3f}")
            if s.cfg.sample_every and done % s.cfg.sample_every == 0:
                save_pictures(s, done)
            if s.cfg.eval_every and done % s.cfg.eval_every == 0:
                log_evaluation(s, done)
            if s.cfg.checkpoint_every and done % s.cfg.checkpoint_every == 0:
                checkpoint(s, done)
            stop_if_signalled(s, done)
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from torch 2.5 on
        if s.phase == "checkpoint":
            raise  # not a batch too large: the message would mislead
        raise SqdfError(out_of_memory_message(s.given, s.phase, step + 1)) from None
    finally:
        bar.close()
        if s.trackers is not None:  # flushed and closed, whether the run ended or failed
            s.trackers.finish()


def stop_if_signalled(s: TrainingRun, done: int) -> None:
    """After update ``done``: if any process received SIGTERM, SIGINT or SIGUSR1, every
    process stops here (an all-reduce of the flag), after a checkpoint at ``done`` (a
    caller's run: the caller keeps what it needs)."""
    signum = agreed_signal(s.procs)
    if signum is None:
        return
    name = signal_name(signum)
    if s.caller is not None:
        raise Preempted(signum, f"stopped by {name} at update {done}")
    if s.last_checkpoint != done:
        checkpoint(s, done)
    raise Preempted(
        signum,
        f"stopped by {name} at update {done}; checkpoint written; continue with: "
        f"sqdf train --resume {s.run}",
    )


def out_of_memory_message(cfg: TrainConfig, phase: str, update: int) -> str:
    """What to lower when the GPU ran out of memory in ``phase`` ("sampling" or "gradient")
    of an update: the settings that size that phase, with their values, as config keys (the
    flags are the same with dashes: --batch-size; sqdf bbo takes them with --set)."""
    if phase == "pictures":  # their size is the task's, not the batch's
        return (
            f"out of GPU memory in update {update}, drawing the --sample-every pictures: set "
            f"sample_every = 0 (now {cfg.sample_every}; it may change on resume)"
        )
    if phase == "evaluation":
        return (
            f"out of GPU memory in update {update}, in the --eval-every evaluation: set "
            f"eval_every = 0 (now {cfg.eval_every}; it may change on resume)"
        )
    where = (
        f"sampling {cfg.batch_size} fresh trajectories"
        if phase == "sampling"
        else f"the gradient micro-batch of {cfg.batch_size * cfg.cells_per_trajectory} cells"
    )
    advice = [f"lower batch_size (now {cfg.batch_size}; raising grad_accum, now "
              f"{cfg.grad_accum}, by the same factor keeps the effective batch)"]  # fmt: skip
    if cfg.task == "sd":
        params = cfg.task_params
        if not params.get("gradient_checkpointing", True):
            advice.append("set task_params.gradient_checkpointing = true")
        resolution = params.get("resolution") or "native"
        advice.append(f"lower task_params.resolution (now {resolution})")
    return f"out of GPU memory at update {update}, {where}: " + "; or ".join(advice)
