"""Before the first update: the checks a run makes of its config, folder and space, the task,
optimizer, replay buffer and loss scaler it builds, config.json, and what a resume restores."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sqdf.config.train_config import TrainConfig
from sqdf.core.kl import KL_SCALES
from sqdf.errors import ConfigError, SqdfError
from sqdf.infra.atomic import WriteError, free_bytes, size_text
from sqdf.infra.checkpoint import (
    Checkpoint,
    checkpoint_step,
    list_checkpoints,
    load_latest_checkpoint,
    tensor_bytes,
)
from sqdf.infra.distributed import Processes, process_change, rank_seed
from sqdf.infra.preemption import stop_here_if_signalled
from sqdf.infra.trackers import RunTrackers, check_installed, parse_log_with
from sqdf.infra.weights import clear as clear_weights
from sqdf.methods import METHODS, build_method_params, check_reward_gradient
from sqdf.methods.grpo import beta_note, check_buffer_scope, check_kl_scale, sweep_note
from sqdf.rewards import is_differentiable, reward_params
from sqdf.run.folder import EVAL_METRICS, prepare_run, read_metrics, truncate_metrics, write_config
from sqdf.run.settings import check_registered, config_sources, preset_processes_note
from sqdf.sampling.buffer import STATE_DTYPES, DiskStore, MemoryStore, ReplayBuffer
from sqdf.tasks import Task, build_task, resolved_reward_name, with_summed_alpha
from sqdf.training.state import TrainingRun, TrainState

log = logging.getLogger("sqdf")


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


def check_method_takes_reward(cfg: TrainConfig) -> None:
    """A method that back-propagates the reward refuses one without a gradient, in one line,
    before anything loads (train, compare's variants and --dry-run all ask)."""
    reward = resolved_reward_name(cfg)
    check_reward_gradient(cfg.method, reward, is_differentiable(reward, cfg.reward_params))


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


def stop_before_training(s: TrainingRun) -> None:
    """A signal during set-up (loading a model can take minutes) stops before any update:
    nothing is trained, so there is nothing new to checkpoint."""
    where = f"at update {s.start}" if s.start else "before the first update"
    again = f"; continue with: sqdf train --resume {s.run}" if s.caller is None else ""
    stop_here_if_signalled(s.procs, f"{where}, nothing new trained{again}")


def make_optimizer(
    params: list[torch.nn.Parameter], cfg: TrainConfig, *, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW at ``cfg.lr``; ``train`` sets each update's rate from ``scheduled_lr``, so no
    scheduler state needs saving."""
    return torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True if fused else None
    )


def use_fused(params: list[torch.nn.Parameter]) -> bool:
    """AdamW's fused kernel (one kernel for every parameter's update instead of a loop of
    them) where it pays: every parameter on a GPU."""
    return bool(params) and all(p.is_cuda for p in params)


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
