"""The cells both sides of the distributed equivalence test use."""

import torch

from sqdf.config.train_config import TrainConfig
from sqdf.sampling.buffer import Cells
from sqdf.sampling.sampler import sample_trajectories
from sqdf.tasks.base import Task

# a clip that bites: the clipped norm is part of what must match
CFG = TrainConfig(task="gmm2d", method="sqdf", device="cpu", num_steps=10, max_grad_norm=0.5)


def global_cells(task: Task, n: int) -> Cells:
    g = torch.Generator().manual_seed(7)
    traj = sample_trajectories(task, n, g)
    k = torch.randint(0, CFG.num_steps, (n,), generator=g)
    rows = torch.arange(n)
    return Cells(
        x_t=traj.states[rows, k], x_next=traj.states[rows, k + 1], step=k, cond=traj.cond,
        reward=torch.zeros(n), index=rows, logp=traj.logp[rows, k],
    )  # fmt: skip


def shard(cells: Cells, rank: int, b: int) -> Cells:
    sl = slice(rank * b, (rank + 1) * b)
    return Cells(**{f: getattr(cells, f)[sl] for f in Cells.__dataclass_fields__})
