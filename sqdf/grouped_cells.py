"""What a method that learns from groups (GRPO) is fed: the cells of the newest batch, in the
order its parameters ask (drawn with replacement, or a sweep that visits each trained step of
each trajectory once a pass), and each cell's group with the statistics of the newest batch,
gathered over processes where a group or the std spans them.

Groups: the trainer's fresh batch is blocks of G consecutive samples of one condition
(``trainer.fresh_conditions``); ``group_by = "block"`` takes a block as the group,
``"condition"`` every sample of the gathered batch with the same condition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sqdf.buffer import HALF, Cells, ReplayBuffer
from sqdf.distributed import Processes
from sqdf.methods.grpo import sweep_order, trained_steps


def gather_varying(procs: Processes, t: Tensor) -> tuple[Tensor, int]:
    """Every process's 1-D ``t`` (lengths may differ: groups with a non-finite reward are not
    stored) concatenated in rank order, and where this process's part starts."""
    sizes = procs.gather(torch.tensor([t.shape[0]])).flatten().tolist()
    longest = max(sizes)
    padded = torch.cat([t, t.new_zeros(longest - t.shape[0])])
    parts = procs.gather(padded)
    whole = torch.cat([parts[r, : sizes[r]] for r in range(len(sizes))])
    return whole, sum(sizes[: procs.rank])


def newest_groups(
    buffer: ReplayBuffer, cells: Cells, params: Any, procs: Processes | None = None
) -> dict[str, Tensor]:
    """Each cell's group, and the newest batch's rewards and groups, for ``grpo_loss``. The
    batch is this process's, or every process's where ``params.global_std`` or
    ``params.group_by == "condition"`` reaches across them."""
    newest = buffer.newest
    found = cells.index[:, None] == newest[None, :]  # (cells, newest)
    if not bool(found.any(dim=1).all()):  # the on-policy buffer draws from the newest only
        raise RuntimeError("a grouped method got cells from outside the newest batch")
    position = found.int().argmax(dim=1)
    rewards = buffer.rewards[newest]
    if params.group_by == "condition":
        ids = buffer.cond[newest].flatten()  # class or prompt indices
    else:
        ids = torch.arange(newest.shape[0]) // params.group_size
    across = params.global_std or params.group_by == "condition"
    if procs is None or procs.world == 1 or not across:
        return {"group": ids[position], "batch_reward": rewards, "batch_group": ids}
    batch_rewards, start = gather_varying(procs, rewards.double())
    if params.group_by == "block":  # blocks are numbered per process: number them apart
        ids = ids + start  # block ids are below the process's sample count, so these differ
    # indices are exact in float64 for the gather
    batch_ids, _ = gather_varying(procs, ids.double())
    return {"group": ids[position], "batch_reward": batch_rewards.to(rewards.dtype),
            "batch_group": batch_ids.to(ids.dtype)}  # fmt: skip


def buffer_cells(buffer: ReplayBuffer, index: Tensor, step: Tensor) -> Cells:
    """The cells (slot ``index``, step ``step``) of the buffer, as its own draws return them."""

    def widen(x: Tensor) -> Tensor:
        return x.float() if x.dtype in HALF else x

    return Cells(
        x_t=widen(buffer.store.read(index, step)),
        x_next=widen(buffer.store.read(index, step + 1)),
        step=step,
        cond=buffer.cond[index],
        reward=buffer.rewards[index],
        index=index,
        logp=buffer.logp[index, step],
    )


@dataclass
class CellSchedule:
    """Which cells of the newest batch a grouped method trains on next: only steps
    0..⌊T f⌋ - 1 (``timestep_fraction``), drawn with replacement (``cell_order = "random"``)
    or in passes that visit each (trajectory, step) once (``"sweep"``). A new batch starts a
    new pass; a resume does too (the pass is not checkpointed)."""

    queue: Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.long))

    @staticmethod
    def needed(params: Any) -> bool:
        """Whether the buffer's own draw (every step, with replacement) will not do."""
        return params.cell_order != "random" or params.timestep_fraction < 1

    def new_batch(self) -> None:
        self.queue = self.queue[:0]

    def draw(self, buffer: ReplayBuffer, n: int, params: Any, generator: torch.Generator) -> Cells:
        newest = buffer.newest
        steps = trained_steps(buffer.num_steps, params.timestep_fraction)
        if params.cell_order == "random":
            position = torch.randint(0, newest.shape[0], (n,), generator=generator)
            step = torch.randint(0, steps, (n,), generator=generator)
        else:
            while self.queue.shape[0] < n:  # the next pass begins where this one ends
                self.queue = torch.cat([self.queue, sweep_order(newest.shape[0], steps, generator)])
            taken, self.queue = self.queue[:n], self.queue[n:]
            position, step = taken[:, 0], taken[:, 1]
        return buffer_cells(buffer, newest[position], step)
