"""Accumulating gradients: ``grad_accum`` micro-batches of (trajectory, step) cells, from the
replay buffer, a grouped method's plan, or truncated fresh trajectories, each through the
method's loss and back-propagated."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from sqdf.config.train_config import TrainConfig
from sqdf.methods import METHODS
from sqdf.sampling.buffer import Cells
from sqdf.sampling.sampler import sample_states_at
from sqdf.tasks import Task
from sqdf.training.grouped_cells import CellSchedule, buffer_cells, gather_newest
from sqdf.training.state import Fresh, Gradients, TrainingRun


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
