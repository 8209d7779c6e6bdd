"""The one training loop every method shares.

Per update: (every ``replay_ratio`` updates) sample a fresh batch of trajectories without
gradients and store it in the replay buffer; draw ``grad_accum`` micro-batches of
(trajectory, step) cells; accumulate the method's loss; clip; AdamW step; log; checkpoint.
With ``rollout = "truncated"`` there is no buffer: each micro-batch is a fresh batch of
trajectories run only as far as the steps its cells use.

``train`` reads as its phases: ``set_up`` (folder, config, task, optimizer, buffer, resume),
then per update ``sample_fresh``, ``accumulate_gradients`` (micro-batches from ``draw_cells``),
``count_update`` (one all-reduce of the counters), ``apply_update`` (clip, skip or step),
``log_update`` and ``checkpoint``; ``finish`` writes RUN/final.

Non-finite values never reach the weights: fresh samples with a non-finite reward are not
stored, and an update whose loss or gradient is not finite is skipped (and counted). After
``max_skips`` consecutive skips the run stops with a message naming the cause.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sqdf.config.train_config import TrainConfig
from sqdf.core.kl import KL_SCALES
from sqdf.errors import ConfigError, DivergedError, SqdfError
from sqdf.evaluation.periodic_eval import PeriodicEval
from sqdf.infra.atomic import (
    WriteError,
    atomic_folder,
    folder_writes,
    free_bytes,
    size_text,
    writing,
)
from sqdf.infra.checkpoint import (
    Checkpoint,
    checkpoint_bytes,
    checkpoint_step,
    list_checkpoints,
    load_latest_checkpoint,
    save_checkpoint,
    save_weights,
    tensor_bytes,
)
from sqdf.infra.distributed import (
    Processes,
    all_gather_rows,
    average_gradients,
    gather_states,
    process_change,
    rank_seed,
)
from sqdf.infra.preemption import (
    Preempted,
    agreed_signal,
    signal_name,
    stop_here_if_signalled,
    stop_on_signals,
)
from sqdf.infra.trackers import RunTrackers, check_installed, parse_log_with
from sqdf.infra.weights import clear as clear_weights
from sqdf.methods import METHODS, build_method_params, check_reward_gradient, group_size
from sqdf.methods.grpo import beta_note, check_buffer_scope, check_kl_scale, sweep_note
from sqdf.rewards import is_differentiable, reward_params
from sqdf.rewards.mixture import WeightedReward
from sqdf.run.folder import (
    EVAL_METRICS,
    append_metrics,
    prepare_run,
    read_metrics,
    truncate_metrics,
    write_config,
)
from sqdf.run.model_card import write_model_card
from sqdf.run.settings import check_registered, config_sources, preset_processes_note
from sqdf.sampling.buffer import STATE_DTYPES, Cells, DiskStore, MemoryStore, ReplayBuffer
from sqdf.sampling.sampler import (
    Trajectories,
    sample_states_at,
    sample_trajectories,
    samples_from_seed,
)
from sqdf.tasks import Task, build_task, resolved_reward_name, with_summed_alpha
from sqdf.training.grouped_cells import CellSchedule, buffer_cells, gather_newest

log = logging.getLogger("sqdf")


def truncated_cells(task: Task, cfg: TrainConfig, generator: torch.Generator) -> Cells:
    """``batch_size`` fresh trajectories, each run only to ``cells_per_trajectory`` distinct
    random steps; one cell per (trajectory, step)."""
    n, m, T = cfg.batch_size, cfg.cells_per_trajectory, cfg.num_steps
    steps = torch.rand((n, T), generator=generator).argsort(dim=1)[:, :m]
    states, cond = sample_states_at(task, n, steps, generator)
    count = n * m
    return Cells(
        x_t=states.flatten(0, 1), x_next=None, step=steps.flatten(),
        cond=cond.repeat_interleave(m, dim=0), reward=torch.full((count,), math.nan),
        index=torch.full((count,), -1, dtype=torch.long),
    )  # fmt: skip


def wait_for(device: torch.device) -> None:
    """Let the work queued on a GPU finish, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


# float16's loss scale at the start: torch's GradScaler default, 2^16, which accelerate's
# scaler (the SQDF reference code's, mixed_precision fp16) starts at too; the first updates
# halve it on each overflow (skipped) until the gradients fit
INITIAL_LOSS_SCALE = 2.0**16


def loss_scaler(task: Task) -> torch.amp.GradScaler | None:
    """A loss scaler where the task computes in float16 (whose small gradients underflow
    without one); None otherwise (bfloat16 has float32's range)."""
    if getattr(task, "dtype", None) != torch.float16:
        return None
    return torch.amp.GradScaler(task.device.type, init_scale=INITIAL_LOSS_SCALE)


def scaler_state(scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """The loss scale as a checkpoint's state keeps it (nothing without a scaler)."""
    return {"loss_scaler": scaler.state_dict()} if scaler is not None else {}


def make_buffer(cfg: TrainConfig, task: Task, run: Path, rank: int) -> ReplayBuffer:
    """The replay buffer ``cfg`` asks for: its states in ``buffer_dtype`` (auto: the task's
    dtype where it has one, else float32; always float32 for a likelihood-ratio method), in
    host memory or in RUN/buffer/ (``buffer_store``;
    each process its own files)."""
    dtype = STATE_DTYPES.get(cfg.buffer_dtype) or getattr(task, "dtype", None) or torch.float32
    if METHODS[cfg.method].likelihood_ratio:  # auto too: ratios of rounded states are biased
        dtype = torch.float32
    store = (
        DiskStore(run / "buffer", dtype, rank) if cfg.buffer_store == "disk" else MemoryStore(dtype)
    )
    return ReplayBuffer(cfg.buffer_size, cfg.buffer, cfg.num_steps, cfg.gamma, store)


def gather_process_states(
    procs: Processes, buffer: ReplayBuffer, generator: torch.Generator, shared: bool = False
) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
    """Every process's replay buffer and random stream, in rank order, for the main process to
    checkpoint; collective (every process calls it; the others get empty lists). A ``shared``
    buffer is the same union in every process: the main process's alone is kept (one copy,
    not one per process in the main process's memory), after a check that the processes'
    buffers agree."""
    if shared:
        check_same_union(procs, buffer)
        buffers = [buffer.state_dict()] if procs.is_main else []
    else:
        buffers = gather_states(procs, buffer.state_dict())
    rngs = [g["rng"] for g in gather_states(procs, {"rng": generator.get_state()})]
    return buffers, rngs


def check_same_union(procs: Processes, buffer: ReplayBuffer) -> None:
    """Raise in every process unless every process's shared buffer holds the same union (its
    size, write position and reward sum agree): what checkpointing one copy relies on."""
    if procs.world == 1:
        return
    rewards = buffer.rewards[: buffer.size].double().sum() if buffer.size else 0.0
    mine = torch.tensor([buffer.size, buffer.ptr, float(rewards)], dtype=torch.float64)
    every = procs.gather(mine)
    if not bool((every == every[0]).all()):
        raise SqdfError(
            "cannot checkpoint a shared buffer: the processes' buffers differ "
            f"(size, position, reward sum per process: {every.tolist()})"
        )


def restore_process_states(
    procs: Processes,
    ck: Checkpoint,
    buffer: ReplayBuffer,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None,
    seed: int,
    shared: bool = False,
) -> None:
    """This process's buffer and random stream, and the loss scale, from ``ck``. A ``shared``
    buffer is the checkpoint's one copy (the main process's), loaded in every process,
    however many there are now. Otherwise a process the checkpointed run did not have starts
    with an empty buffer; a process without a stream of its own in ``ck`` gets a new one. The
    main process says what the change of process count does."""
    if scaler is not None and "loss_scaler" in ck.state:
        scaler.load_state_dict(ck.state["loss_scaler"])
    if shared:
        union = ck.buffers[0] if ck.buffers else {}
        if "rows" in union and procs.world > len(ck.rngs):  # every process sees the same
            # a disk buffer's rows live in each process's own files, which a new one lacks
            raise SqdfError(
                f"cannot resume a shared buffer kept on disk (buffer_store disk) on "
                f"{procs.world} processes: the run wrote files for {len(ck.rngs)}; resume on "
                f"at most {len(ck.rngs)}, or with buffer_store memory"
            )
        buffer.load_state_dict(union)
    elif procs.rank < len(ck.buffers):
        buffer.load_state_dict(ck.buffers[procs.rank])
    if procs.rank < len(ck.rngs):
        generator.set_state(ck.rngs[procs.rank])
    else:
        generator.manual_seed(rank_seed(seed, procs.rank, ck.step))
    if len(ck.rngs) != procs.world and procs.is_main:
        log.warning(process_change(len(ck.rngs), procs.world, shared))


def kl_resolution(given: TrainConfig, cfg: TrainConfig, task: Task) -> dict[str, Any]:
    """How alpha was written and what the losses use: for config.json and the log."""
    return {
        "kl_scale": given.kl_scale,
        "alpha": given.alpha,
        "dims": math.prod(task.sample_shape),
        "alpha_sum": cfg.alpha,
    }


def alpha_note(kl: dict[str, Any]) -> str:
    """One line saying how an alpha written per dimension became the exact summed KL's weight."""
    factor = KL_SCALES[kl["kl_scale"]]
    return (
        f"alpha {kl['alpha']:g} (kl_scale {kl['kl_scale']}) = {kl['alpha']:g} x {factor:g} / "
        f"D = {kl['alpha_sum']:.4g} as the weight of the exact KL summed over D = "
        f"{kl['dims']:,} dimensions"
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


def use_fused(params: list[torch.nn.Parameter]) -> bool:
    """AdamW's fused kernel (one kernel for every parameter's update instead of a loop of
    them) where it pays: every parameter on a GPU."""
    return bool(params) and all(p.is_cuda for p in params)


def make_optimizer(
    params: list[torch.nn.Parameter], cfg: TrainConfig, *, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW at ``cfg.lr``; ``train`` sets each update's rate from ``scheduled_lr``, so no
    scheduler state needs saving."""
    return torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True if fused else None
    )


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


def set_learning_rate(s: TrainingRun, update: int) -> None:
    """Every parameter group at update ``update``'s scheduled rate, before its step: a pure
    function of the update, so a resumed run (whose optimizer state holds the rate of the
    checkpoint's last update) continues the schedule exactly. A skipped update keeps its place."""
    lr = scheduled_lr(s.cfg, update)
    for group in s.optimizer.param_groups:
        group["lr"] = lr


def check_fsdp(task: Task, cfg: TrainConfig) -> None:
    """What FSDP cannot run: a policy that is not the network the task calls (a LoRA wrapper:
    calling the wrapped network would bypass the shards' gathering), or any pass count that
    differs between processes (every forward and backward of a sharded network is collective)."""
    if not task.shardable:
        raise ConfigError(
            f"FSDP shards a fully fine-tuned network; task {cfg.task} trains a LoRA here: set "
            'task_params.finetune = "full", or launch without the FSDP config (a LoRA needs '
            "no sharding)"
        )
    if getattr(task, "dtype", None) == torch.float16:
        raise ConfigError(
            "float16 cannot run under FSDP here (its loss scaler needs whole gradients): use "
            'task_params.dtype = "bfloat16", or the accelerate config\'s mixed_precision'
        )
    if cfg.rollout == "truncated":
        raise ConfigError(
            "rollout truncated cannot run under FSDP: each process runs its trajectories to "
            "its own steps, so the processes make different numbers of sharded passes"
        )
    why = METHODS[cfg.method].uneven_passes
    if why:
        raise ConfigError(
            f"method {cfg.method} cannot run under FSDP: {why}, so the processes make "
            "different numbers of sharded passes"
        )


@dataclass
class TrainState:
    """What a caller carries from one ``train`` call to the next (sqdf.bbo's rounds): the task
    (whose ``reward_model`` the caller may have swapped, e.g. for a proxy), and the optimizer,
    replay buffer and generator, which ``train`` creates when they are None and leaves here.
    ``fresh``, when set, is a batch the caller already sampled and scored (e.g. by an oracle):
    it is stored in place of the first freshly sampled batch."""

    task: Task
    optimizer: torch.optim.Optimizer | None = None
    buffer: ReplayBuffer | None = None
    generator: torch.Generator | None = None
    fresh: tuple[Trajectories, torch.Tensor] | None = None
    scaler: torch.amp.GradScaler | None = None  # float16 tasks: the loss scale, carried


@dataclass
class TrainingRun:
    """One ``train`` call's working set: built by ``set_up``, carried through the phases."""

    given: TrainConfig  # the config as the caller wrote it (config.json, messages)
    cfg: TrainConfig  # the same with alpha as the weight of the exact, summed KL
    run: Path
    procs: Processes
    task: Task
    method_params: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    buffer: ReplayBuffer
    generator: torch.Generator
    scaler: torch.amp.GradScaler | None
    caller: TrainState | None
    counters: dict[str, float]
    start: int = 0
    consecutive_skips: int = 0
    t0: float = 0.0
    phase: str = "sampling"  # what the update is doing: sampling, gradient or checkpoint
    trackers: RunTrackers | None = None  # --log-with, on the main process
    # --sample-every: the pictures' conditions and reference samples, drawn once
    picture_reference: tuple[torch.Tensor, torch.Tensor] | None = None
    ema: list[torch.Tensor] | None = None  # --ema-decay: a moving average of each of params
    evaluation: PeriodicEval | None = None  # --eval-every, with its reference kept
    last_checkpoint: int = -1  # the update of the newest checkpoint this run has (-1: none)
    # a reward mixture's components of the newest stored batch (what Fresh.parts reports)
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    # a grouped method's order over the newest batch's cells, where it asks for its own
    cell_schedule: CellSchedule = field(default_factory=CellSchedule)


@dataclass
class Fresh:
    """What sampling fresh trajectories gave this update (nothing on a replay-only update)."""

    bad: int = 0  # samples whose reward was not finite (not stored)
    sampled: int = 0
    cause: str = ""
    rewards: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    # a reward mixture's components of the newest stored batch, by name (float64)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Gradients:
    """The accumulated micro-batches of one update, before the processes' tally."""

    loss: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)
    method_evals: int = 0
    partial: int = 0  # truncated trajectories run part way (never scored)
    skip: bool = False
    cause: str = ""


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


def check_method_takes_reward(cfg: TrainConfig) -> None:
    """A method that back-propagates the reward refuses one without a gradient, in one line,
    before anything loads (train, compare's variants and --dry-run all ask)."""
    reward = resolved_reward_name(cfg)
    check_reward_gradient(cfg.method, reward, is_differentiable(reward, cfg.reward_params))


def stop_before_training(s: TrainingRun) -> None:
    """A signal during set-up (loading a model can take minutes) stops before any update:
    nothing is trained, so there is nothing new to checkpoint."""
    where = f"at update {s.start}" if s.start else "before the first update"
    again = f"; continue with: sqdf train --resume {s.run}" if s.caller is None else ""
    stop_here_if_signalled(s.procs, f"{where}, nothing new trained{again}")


def continue_note(run: Path) -> str:
    """What a failed write leaves to go on from, for the end of its message."""
    kept = list_checkpoints(run / "checkpoints")
    if not kept:
        return "; no checkpoint was written yet"
    return (
        f"; the checkpoints before it are kept (newest: {kept[-1].name}): free space or make "
        f"the folder writable, then continue with: sqdf train --resume {run}"
    )


def first_checkpoint_bytes(s: TrainingRun) -> int:
    """About the bytes of the run's first checkpoint: its weights, AdamW's two moments of the
    trained ones, the moving average, and every process's replay buffer at full size (one
    copy of a shared buffer; a disk store's states stay in RUN/buffer/, reserved at its first
    batch and not counted here). An estimate: rotation writes a checkpoint before it removes
    the oldest."""
    weights = tensor_bytes(s.task.policy.state_dict())
    moments = 2 * sum(p.numel() * p.element_size() for p in s.params)
    average = weights if s.ema is not None else 0
    buffer = 0
    if s.cfg.rollout == "full" and not s.buffer.store.on_disk:
        dtype = s.buffer.store.dtype or torch.float32
        per_sample = (s.cfg.num_steps + 1) * math.prod(s.task.sample_shape)
        copies = 1 if s.cfg.buffer_scope == "shared" else s.procs.world  # one union kept
        buffer = s.cfg.buffer_size * per_sample * dtype.itemsize * copies
    return weights + moments + average + buffer


def check_free_space(s: TrainingRun) -> None:
    """Before the first update: stop (every process) if the run folder's file system has
    less room than the first checkpoint needs (the final weights where the run keeps no
    checkpoints), rather than training until a write fails."""
    if s.caller is not None:
        return
    problem = ""
    if s.procs.is_main:
        needs = first_checkpoint_bytes(s)
        what = "its first checkpoint"
        if not s.cfg.checkpoint_every or s.start >= s.cfg.steps:
            # no checkpoint to write (none asked for, or a resume that only writes final/)
            needs, what = tensor_bytes(s.task.policy.state_dict()), "its final weights"
        free = free_bytes(s.run)
        if free is not None and free < needs:
            problem = (
                f"not enough space for {s.run}: {what} needs about {size_text(needs)}, "
                f"{size_text(free)} free there; free space or give another --out"
            )
    if float(s.procs.sum(torch.tensor(float(bool(problem))))) > 0:
        raise WriteError(problem or "the main process found too little space for the run")


def check_shared_buffer(cfg: TrainConfig, world: int) -> None:
    """A shared buffer stores every process's fresh trajectories: one round of them must fit."""
    union = cfg.fresh_count * world
    if cfg.buffer_scope == "shared" and union > cfg.buffer_size:
        raise ConfigError(
            f"buffer_scope shared stores {cfg.fresh_count} fresh trajectories x {world} "
            f"processes = {union} a round, more than buffer_size {cfg.buffer_size}"
        )


def check_reference_compat(task: Task, world: int) -> None:
    """reference_compat runs on one process: the reference code's ranks train a LoRA each
    (gradients never averaged); sqdf checkpoints and resumes one policy, so it cannot
    reproduce that honestly."""
    if getattr(task, "reference_compat", False) and world > 1:
        raise ConfigError(
            "task_params.reference_compat reproduces one rank of the SQDF reference code, "
            f"which trains a separate LoRA per process; run it on one process, not {world}"
        )


def set_up(
    cfg: TrainConfig,
    run: Path,
    *,
    resume: bool,
    progress: bool,
    state: TrainState | None,
    sources: dict[str, str] | None,
) -> TrainingRun:
    """Check the folder and the config, build (or take) the task, write config.json, make the
    optimizer, buffer and stream, and restore them from the latest checkpoint on resume."""
    if state is not None and resume:
        raise ValueError("train: resume and a caller's state exclude each other")
    check_registered(cfg)  # a TrainConfig built in Python has not met the registries yet
    if state is None:  # a new run records only its own weights (a caller's task holds its own)
        clear_weights()
    if state is not None and state.fresh is not None and METHODS[cfg.method].grouped:
        raise ValueError(f"train: method {cfg.method} samples its own groups, not a caller's batch")
    check_installed(parse_log_with(cfg.log_with))  # before a model is loaded
    procs = Processes(cfg.device)
    check_shared_buffer(cfg, procs.world)
    saved = prepare_run(run, cfg, resume) if procs.is_main else None
    procs.barrier()  # the folder is checked (and made) before any process reads it
    trained = list_checkpoints(run / "checkpoints") if resume else []
    if trained and checkpoint_step(trained[-1]) > cfg.steps:
        # every process refuses, before anything is written: the folder stays as it was
        raise SqdfError(
            f"cannot resume {run} to steps {cfg.steps}: its latest checkpoint is at update "
            f"{checkpoint_step(trained[-1])}; give steps >= that (training cannot be undone)"
        )
    method_params = build_method_params(cfg.method, cfg.method_params)
    if state is None:  # (a caller's task trains on the caller's reward: BBO's proxy)
        check_method_takes_reward(cfg)
        torch.manual_seed(cfg.seed)  # the policy's initialisation, the same in every process
        task = build_task(dataclasses.replace(cfg, device=procs.device(cfg.device)))
    else:
        task = state.task
    check_reference_compat(task, procs.world)
    if METHODS[cfg.method].grouped:
        check_kl_scale(task, method_params)
        check_buffer_scope(cfg, method_params)
    given, cfg = cfg, with_summed_alpha(cfg)  # the losses weight the exact, summed KL
    if procs.is_main:
        write_config(
            run,
            given,
            {
                "task_params": dataclasses.asdict(task.options) if hasattr(task, "options") else {},
                "reward": getattr(task.reward_model, "name", None) or resolved_reward_name(cfg),
                "reward_params": reward_params(task.reward_model),
                "method_params": dataclasses.asdict(method_params),
                "device": str(task.device),
                "processes": procs.world,
                "fresh_trajectories_per_process": cfg.fresh_count,
                "kl": kl_resolution(given, cfg, task),
            },
            config_sources(given, sources),
        )
    if progress and procs.is_main:
        print(f"sqdf: {batch_note(cfg, procs.world)}", file=sys.stderr)
    if given.kl_scale != "sum" and procs.is_main:  # said even without progress: it sets the KL
        print(f"sqdf: {alpha_note(kl_resolution(given, cfg, task))}", file=sys.stderr)
    if METHODS[cfg.method].grouped and procs.is_main:  # said even without progress
        for note in (beta_note(task, method_params),
                     sweep_note(cfg, cfg.num_steps, method_params),
                     preset_processes_note(sources, procs.world)):  # fmt: skip
            if note:
                print(f"sqdf: {note}", file=sys.stderr)
    params = [p for p in task.policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, fused=use_fused(params) and not procs.fsdp)
    if procs.fsdp:
        check_fsdp(task, cfg)
        params = procs.prepare(task.policy, optimizer)  # the shards replace the parameters
        if progress and procs.is_main:
            from torch.distributed.fsdp import FSDPModule

            units = sum(isinstance(m, FSDPModule) for m in task.policy.modules())
            print(
                f"sqdf: FSDP2 shards the policy over {procs.world} processes in {units} "
                "unit(s), each gathered only while it runs",
                file=sys.stderr,
            )
    buffer = make_buffer(cfg, task, run, procs.rank)
    generator = torch.Generator().manual_seed(rank_seed(cfg.seed, procs.rank))
    scaler = loss_scaler(task)
    if state is not None:
        optimizer = state.optimizer = state.optimizer or optimizer
        buffer = state.buffer = state.buffer or buffer
        generator = state.generator = state.generator or generator
        scaler = state.scaler = state.scaler or scaler
    counters = {
        "samples_seen": 0, "reward_evals": 0, "skipped_updates": 0, "nonfinite_rewards": 0,
        "wall_s": 0.0, "sample_s": 0.0, "ema_updates": 0,
    }  # fmt: skip
    s = TrainingRun(
        given=given, cfg=cfg, run=run, procs=procs, task=task, method_params=method_params,
        params=params, optimizer=optimizer, buffer=buffer, generator=generator, scaler=scaler,
        caller=state, counters=counters,
    )  # fmt: skip
    if cfg.ema_decay > 0:
        s.ema = [p.detach().clone() for p in params]  # starts at the pretrained policy
    ck = load_latest_checkpoint(run / "checkpoints") if resume else None
    if ck is not None:
        if s.ema is not None:  # the average is the policy's shape: loaded through it
            if ck.ema is None:
                raise SqdfError(f"{run}: its checkpoint has no EMA weights to resume from")
            procs.load_model_state(task.policy, ck.ema)
            s.ema = [p.detach().clone() for p in params]
        procs.load_model_state(task.policy, ck.policy)
        procs.load_optimizer_state(task.policy, optimizer, ck.optimizer)
        s.start = ck.step
        counters.update({k: ck.state[k] for k in counters if k in ck.state})
        # a run stopped inside a streak of skipped updates resumes inside it
        s.consecutive_skips = int(ck.state.get("consecutive_skips", 0))
        restore_process_states(
            procs, ck, buffer, generator, scaler, cfg.seed, cfg.buffer_scope == "shared"
        )
    if procs.is_main:
        first_dropped = truncate_metrics(
            run, s.start, saved.log_every if saved is not None else cfg.log_every
        )
        # rows of any eval_every grid stand: only those past the checkpoint are redone
        eval_dropped = truncate_metrics(run, s.start, 1, EVAL_METRICS)
        if eval_dropped is not None:
            first_dropped = min(first_dropped or eval_dropped, eval_dropped)
        for old in (run / "samples").glob("step_*.png"):  # an earlier attempt's, past start
            if int(old.stem.removeprefix("step_")) > s.start:
                old.unlink()
        names = parse_log_with(given.log_with)
        if names:  # opened last: nothing before it can fail and leave a tracker run open
            doc = json.loads((run / "config.json").read_text())
            config = {"train": doc["train"], "resolved": doc["resolved"]}  # as given, as run
            # the trackers drop what metrics.jsonl dropped, from its first dropped row on
            purge = min(s.start + 1, first_dropped or s.start + 1)
            s.trackers = RunTrackers(names, run, config, purge)
            for step in range(purge, s.start + 1):  # pictures kept on disk, dropped there
                picture = run / "samples" / f"step_{step:07d}.png"
                if picture.is_file():
                    s.trackers.log_image("samples", picture, step)
            for row in read_metrics(run, EVAL_METRICS):  # evaluations kept, dropped there
                if purge <= row["step"] <= s.start:
                    values = {f"eval/{k}": v for k, v in row.items() if k != "step"}
                    s.trackers.log(values, row["step"])
    s.t0 = time.perf_counter() - counters["wall_s"]
    return s


def batch_note(cfg: TrainConfig, world: int) -> str:
    """What one update consumes, for the start of a run."""
    cells = cfg.batch_size * cfg.cells_per_trajectory  # per micro-batch and process
    fresh = (
        f"{cfg.batch_size * world * cfg.grad_accum} truncated trajectories per update"
        if cfg.rollout == "truncated"
        else f"{cfg.fresh_count * world} fresh trajectories every {cfg.replay_ratio} update(s) "
        f"= {cfg.fresh_count} per process x {world} process(es)"
    )
    return (
        f"effective batch {cells * world * cfg.grad_accum} cells per update = {cells} per "
        f"process x {world} process(es) x {cfg.grad_accum} accumulation step(s); {fresh}"
    )


def sample_fresh(s: TrainingRun, step: int) -> Fresh:
    """Every ``replay_ratio`` updates (full rollouts only): a fresh batch of trajectories,
    scored and stored (those with a finite reward; for a grouped method, the groups finite
    throughout). Returns the newest batch's rewards too."""
    cfg, fresh = s.cfg, Fresh()
    s.phase = "sampling"
    if step % cfg.replay_ratio == 0 and cfg.rollout == "full":
        began = time.perf_counter()
        if step == s.start and s.caller is not None and s.caller.fresh is not None:
            (traj, rewards), parts = s.caller.fresh, {}
        else:
            traj, rewards, parts = sample_scored(s)
        finite = torch.isfinite(rewards).cpu()  # waits for the GPU
        s.counters["sample_s"] += time.perf_counter() - began
        fresh.bad, fresh.sampled = int((~finite).sum()), finite.shape[0]
        if fresh.bad:
            fresh.cause = (
                f"the reward was not finite for {fresh.bad} of {fresh.sampled} fresh samples"
            )
        keep = whole_groups(finite, group_size(cfg.method, s.method_params))
        kept, kept_rewards = traj.select(keep), rewards.cpu()[keep]
        kept_parts = {n: p.cpu()[keep].double() for n, p in parts.items()}
        if cfg.buffer_scope == "shared":  # every process stores the union, in rank order
            kept, kept_rewards, kept_parts = share_fresh(s.procs, kept, kept_rewards, kept_parts)
        if kept_rewards.numel():
            s.buffer.add(kept, kept_rewards)
            s.cell_schedule.new_batch()
            s.reward_parts = kept_parts
    fresh.rewards = s.buffer.rewards[s.buffer.newest].double()
    fresh.parts = s.reward_parts
    return fresh


def sample_scored(s: TrainingRun) -> tuple[Trajectories, torch.Tensor, dict[str, torch.Tensor]]:
    """``fresh_count`` fresh trajectories of this process, sampled and scored in batches of
    at most ``batch_size`` (what one sampling pass holds in memory), with their rewards and a
    mixture's components."""
    cfg, task = s.cfg, s.task
    trajs, rewards, parts = [], [], []
    left = cfg.fresh_count
    while left > 0:
        n = min(cfg.batch_size, left)
        cond = fresh_conditions(s, n)  # None: the sampler draws them
        traj = sample_trajectories(task, n, s.generator, cond=cond)
        with torch.no_grad():
            r, p = task.reward_with_parts(traj.x0.to(task.device), traj.cond.to(task.device))
        trajs.append(traj)
        rewards.append(r)
        parts.append(p)
        left -= n
    if len(trajs) == 1:
        return trajs[0], rewards[0], parts[0]
    joined = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    return concat_trajectories(trajs), torch.cat(rewards), joined


def concat_trajectories(trajs: list[Trajectories]) -> Trajectories:
    """Batches of trajectories as one, in order."""

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(t, name) for t in trajs]
        return None if values[0] is None else torch.cat(values)

    return Trajectories(cat("states"), cat("cond"), cat("kl"), cat("logp"))


def share_fresh(
    procs: Processes,
    traj: Trajectories,
    rewards: torch.Tensor,
    parts: dict[str, torch.Tensor],
) -> tuple[Trajectories, torch.Tensor, dict[str, torch.Tensor]]:
    """Every process's kept fresh trajectories, rewards and reward components, joined in rank
    order: what each process stores with buffer_scope shared, so that every buffer holds the
    same union and each process replays from all of it (collective)."""
    if procs.world == 1:
        return traj, rewards, parts
    fields = {"states": traj.states, "cond": traj.cond, "rewards": rewards}
    for name in ("kl", "logp"):
        if getattr(traj, name) is not None:
            fields[name] = getattr(traj, name)
    fields.update({f"part.{k}": v for k, v in parts.items()})
    joined = all_gather_rows(procs, fields)
    union = Trajectories(joined["states"], joined["cond"], joined.get("kl"), joined.get("logp"))
    shared_parts = {k.removeprefix("part."): v for k, v in joined.items() if k.startswith("part.")}
    return union, joined["rewards"], shared_parts


def fresh_conditions(s: TrainingRun, n: int) -> torch.Tensor | None:
    """A fresh batch's conditions for a method that learns from groups of G (GRPO):
    n / G of the task's draws, each repeated G times in a row. None for the others:
    the sampler draws them, one per sample."""
    size = group_size(s.cfg.method, s.method_params)
    if size == 1:
        return None
    return s.task.sample_conditions(n // size, s.generator).repeat_interleave(size)


def whole_groups(finite: torch.Tensor, size: int) -> torch.Tensor:
    """The positions of a fresh batch to store: those with a finite reward; in groups of
    ``size`` consecutive samples, only the groups finite throughout, so that every stored
    group is normalised over all its members and the newest batch stays whole groups."""
    return finite.view(-1, size).all(dim=1).repeat_interleave(size).nonzero().squeeze(1)


def draw_cells(
    s: TrainingRun, grads: Gradients, planned: tuple[torch.Tensor, torch.Tensor] | None = None
) -> Cells:
    """One micro-batch of (trajectory, step) cells: those ``planned`` (positions in the newest
    batch, steps), from the replay buffer, or (truncated rollouts) fresh trajectories run
    only as far as the steps they are used at."""
    cfg = s.cfg
    if planned is not None:
        return buffer_cells(s.buffer, s.buffer.newest[planned[0]], planned[1])
    if cfg.rollout != "truncated":
        return s.buffer.sample_cells(cfg.batch_size, s.generator)
    s.phase = "sampling"
    began = time.perf_counter()
    cells = truncated_cells(s.task, cfg, s.generator)
    wait_for(s.task.device)
    s.counters["sample_s"] += time.perf_counter() - began
    grads.partial += cfg.batch_size  # trajectories run part way, never scored
    s.phase = "gradient"
    return cells


def accumulate_gradients(s: TrainingRun, fresh: Fresh) -> Gradients:
    """``grad_accum`` micro-batches of the method's loss, back-propagated (scaled where a loss
    scaler runs); an update with nothing to learn from, or a non-finite loss, is marked
    skipped with its cause."""
    cfg, procs = s.cfg, s.procs
    s.phase = "gradient"
    s.optimizer.zero_grad(set_to_none=True)
    grads = Gradients(cause=fresh.cause)
    grads.skip = s.buffer.size == 0 and cfg.rollout != "truncated"
    if grads.skip:
        grads.cause = (grads.cause + "; " if grads.cause else "") + (
            "no sample has a finite reward yet"
        )
    if procs.fsdp and float(procs.sum(torch.tensor(float(grads.skip)))) > 0:
        # sharded passes are collective: all processes skip, or none does
        grads.skip = True
        grads.cause = grads.cause or "another process has no sample to learn from"
    loss_fn, grouped = METHODS[cfg.method].loss, METHODS[cfg.method].grouped
    # collective where groups span processes: once an update on every process, before a
    # process may leave its micro-batches early (a non-finite loss) or run none
    newest = gather_newest(s.buffer, s.method_params, procs) if grouped else None
    plan = planned_cells(s, newest) if grouped and not grads.skip else None
    for i in range(cfg.grad_accum if not grads.skip else 0):
        cells = draw_cells(s, grads, plan.cells[i] if plan is not None else None)
        extra = {}
        if newest is not None:
            extra = newest.cell_groups(s.buffer, cells)
            if plan is not None and plan.kept is not None:
                extra["kept_cells"] = plan.kept
        loss, stats = loss_fn(s.task, cells, cfg, s.method_params, s.generator, **extra)
        if not torch.isfinite(loss):
            grads.skip, grads.cause = True, f"the loss was {loss.item()}"
            if not procs.fsdp:
                break
            # under FSDP the backward (collective) still runs; the gradient norm,
            # non-finite on every process then, skips the update everywhere
        scaled = loss / cfg.grad_accum
        (s.scaler.scale(scaled) if s.scaler is not None else scaled).backward()
        grads.loss += loss.item() / cfg.grad_accum
        grads.method_evals += int(stats.pop("reward_evals", 0))
        for k, v in stats.items():
            grads.stats[k] = grads.stats.get(k, 0.0) + v / cfg.grad_accum
    return grads


@dataclass
class PlannedCells:
    """A grouped method's cells of one update, drawn before its first micro-batch."""

    cells: list[tuple[torch.Tensor, torch.Tensor]]  # per micro-batch: (positions, steps)
    # drop_zero_advantage: the kept cells over the update, per micro-batch (the mean's
    # denominator, so that every kept cell of the update weighs the same)
    kept: float | None = None


def planned_cells(s: TrainingRun, newest: Any) -> PlannedCells | None:
    """The update's cells where the method orders them itself (``CellSchedule.needed``)."""
    cfg, params = s.cfg, s.method_params
    if not CellSchedule.needed(params):
        return None
    cells = [s.cell_schedule.plan(s.buffer, cfg.batch_size, params, s.generator)
             for _ in range(cfg.grad_accum)]  # fmt: skip
    if not params.drop_zero_advantage:
        return PlannedCells(cells)
    nonzero = newest.advantages(params) != 0
    kept = sum(int(nonzero[position].sum()) for position, _ in cells)
    return PlannedCells(cells, kept / cfg.grad_accum)


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


def checkpoint(s: TrainingRun, step: int) -> None:
    """A resumable checkpoint at update ``step``: every process takes part (its buffer and
    stream are gathered); the main one writes."""
    procs = s.procs
    s.phase = "checkpoint"
    buffers, rngs = gather_process_states(
        procs, s.buffer, s.generator, s.cfg.buffer_scope == "shared"
    )
    policy = procs.model_state(s.task.policy)  # collective under FSDP
    optimizer_state = procs.optimizer_state(s.task.policy, s.optimizer)
    ema = None
    if s.ema is not None and (procs.is_main or procs.fsdp):  # FSDP gathers on every process
        with ema_weights(s):  # copies: a state dict may share the parameters' storage
            state = procs.model_state(s.task.policy)
            ema = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
    if procs.is_main:
        ck = Checkpoint(
            step=step,
            policy=policy,
            optimizer=optimizer_state,
            buffers=buffers,
            rngs=rngs,
            state={
                **s.counters,
                "wall_s": time.perf_counter() - s.t0,
                "consecutive_skips": s.consecutive_skips,
                **scaler_state(s.scaler),
            },
            ema=ema,
        )
        root = s.run / "checkpoints"
        note = (lambda: continue_note(s.run)) if s.caller is None else str
        with writing(f"checkpoint step_{step:07d}", root, checkpoint_bytes(ck), note):
            save_checkpoint(root, ck, keep=s.cfg.keep_checkpoints)
    s.last_checkpoint = step
    if s.buffer.store.on_disk:
        # a process writes its shard's free rows with its next batch, which may be rows of
        # the checkpoint before: not until this one is written
        procs.barrier()


def finish(s: TrainingRun, command: str | None = None) -> Path:
    """The final policy (and the task's extra files) into RUN/final, its moving average
    likewise into RUN/final/ema, with a model card (README.md) of a run of its own (not a
    round of sqdf bbo); returns the run folder. A run that keeps checkpoints writes
    one at its last update first, so that weights final/ cannot hold stay resumable."""
    if s.caller is None and s.cfg.checkpoint_every and s.last_checkpoint != s.cfg.steps:
        checkpoint(s, s.cfg.steps)
    # built under a temporary name and renamed into place, so that a final/ that exists is
    # whole (sqdf compare --resume takes a variant with one as finished)
    final = s.run / "final"
    needs = tensor_bytes(s.task.policy.state_dict()) * (2 if s.ema is not None else 1)
    with (
        writing("the final weights", final, needs, lambda: final_note(s)),
        atomic_folder(final, owner=s.procs.is_main) as staging,
    ):
        save_final_weights(s, staging)
        if s.ema is not None:
            with ema_weights(s):
                save_final_weights(s, staging / "ema")
        if s.caller is None and s.procs.is_main:
            card_or_warning(staging, s, command)
    s.procs.barrier()  # no process returns before the run folder is complete
    return s.run


def card_or_warning(staging: Path, s: TrainingRun, command: str | None) -> None:
    """final/README.md, or one line saying why there is none: the card describes the weights,
    and a failure to write it must not lose them (sqdf push writes a missing one)."""
    try:
        write_model_card(staging, s.run, s.given, resolved_reward_name(s.given), command)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"sqdf: warning: no model card in {s.run / 'final'}: {reason}", file=sys.stderr)


def final_note(s: TrainingRun) -> str:
    """Where the weights are when final/ could not be written, for the end of its message."""
    if s.caller is not None:
        return ""
    if s.last_checkpoint != s.cfg.steps:
        return "; the run keeps no checkpoint (checkpoint_every 0), so these weights are lost"
    return (
        f"; the trained weights are in checkpoints/step_{s.cfg.steps:07d}: free space, then "
        f"write final/ with: sqdf train --resume {s.run}"
    )


def save_final_weights(s: TrainingRun, folder: Path) -> None:
    policy = s.procs.model_state(s.task.policy)  # collective under FSDP
    if s.procs.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(policy, folder / "policy.safetensors")
        s.task.save_final(folder, policy)


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


def ema_decay_at(decay: float, updates: int) -> float:
    """The average's decay after ``updates`` optimizer steps: ``decay``, warmed up as
    diffusers' EMAModel does, min(decay, (1 + t) / (10 + t)), so that an early average is not
    mostly the pretrained weights (at 0.999 without it, 74 % of the average after 300
    updates would still be the starting policy)."""
    return min(decay, (1 + updates) / (10 + updates))
