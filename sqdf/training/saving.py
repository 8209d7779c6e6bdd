"""What a run writes to continue and to keep: resumable checkpoints (every process's buffer
and stream gathered, the main process writing) and RUN/final with its model card."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from sqdf.errors import SqdfError
from sqdf.infra.atomic import atomic_folder, writing
from sqdf.infra.checkpoint import (
    Checkpoint,
    checkpoint_bytes,
    list_checkpoints,
    save_checkpoint,
    save_weights,
    tensor_bytes,
)
from sqdf.infra.distributed import Processes, gather_states
from sqdf.run.model_card import write_model_card
from sqdf.sampling.buffer import ReplayBuffer
from sqdf.tasks import resolved_reward_name
from sqdf.training.state import TrainingRun
from sqdf.training.update import ema_weights


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


def scaler_state(scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """The loss scale as a checkpoint's state keeps it (nothing without a scaler)."""
    return {"loss_scaler": scaler.state_dict()} if scaler is not None else {}


def continue_note(run: Path) -> str:
    """What a failed write leaves to go on from, for the end of its message."""
    kept = list_checkpoints(run / "checkpoints")
    if not kept:
        return "; no checkpoint was written yet"
    return (
        f"; the checkpoints before it are kept (newest: {kept[-1].name}): free space or make "
        f"the folder writable, then continue with: sqdf train --resume {run}"
    )


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
