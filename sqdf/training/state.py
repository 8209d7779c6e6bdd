"""What a training run carries from phase to phase: the caller's state between ``train``
calls (TrainState), the run's working set (TrainingRun), and what one update's sampling
(Fresh) and micro-batches (Gradients) hand on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sqdf.config.train_config import TrainConfig
from sqdf.evaluation.periodic_eval import PeriodicEval
from sqdf.infra.distributed import Processes
from sqdf.infra.trackers import RunTrackers
from sqdf.sampling.buffer import ReplayBuffer
from sqdf.sampling.sampler import Trajectories
from sqdf.tasks import Task
from sqdf.training.grouped_cells import CellSchedule


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
