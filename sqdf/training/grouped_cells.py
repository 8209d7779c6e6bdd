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

from sqdf.infra.distributed import Processes
from sqdf.methods.grpo import group_advantages, sweep_order, trained_steps
from sqdf.sampling.buffer import Cells, ReplayBuffer


def gather_varying(procs: Processes, t: Tensor) -> tuple[Tensor, int]:
    """Every process's 1-D ``t`` (lengths may differ: groups with a non-finite reward are not
    stored) concatenated in rank order, and where this process's part starts."""
    sizes = procs.gather(torch.tensor([t.shape[0]])).flatten().tolist()
    longest = max(sizes)
    padded = torch.cat([t, t.new_zeros(longest - t.shape[0])])
    parts = procs.gather(padded)
    whole = torch.cat([parts[r, : sizes[r]] for r in range(len(sizes))])
    return whole, sum(sizes[: procs.rank])


@dataclass
class NewestBatch:
    """The newest batch's groups and rewards as every cell of an update needs them: this
    process's samples' group ids, and the rewards and groups whose statistics normalise them
    (this process's batch, or every process's, gathered once an update)."""

    ids: Tensor  # (N,) the group of each of this process's newest samples
    batch_reward: Tensor  # (M,) float64
    batch_group: Tensor  # (M,)
    reward: Tensor  # (N,) this process's newest rewards, float64

    def cell_groups(self, buffer: ReplayBuffer, cells: Cells) -> dict[str, Tensor]:
        """Each cell's group and the batch's statistics, the keywords of ``grpo_loss``."""
        return {"group": self.ids[newest_positions(buffer, cells.index)],
                "batch_reward": self.batch_reward, "batch_group": self.batch_group}  # fmt: skip

    def advantages(self, params: Any) -> Tensor:
        """(N,) the clipped advantage of each of this process's newest samples."""
        adv = group_advantages(self.reward, self.ids, self.batch_reward, self.batch_group,
                               std=params.std, global_std=params.global_std)  # fmt: skip
        return adv.clamp(-params.adv_clip, params.adv_clip)


def newest_positions(buffer: ReplayBuffer, index: Tensor) -> Tensor:
    """Where each buffer slot ``index`` sits in the newest batch."""
    found = index[:, None] == buffer.newest[None, :]  # (cells, newest)
    if not bool(found.any(dim=1).all()):  # the on-policy buffer draws from the newest only
        raise RuntimeError("a grouped method got cells from outside the newest batch")
    return found.int().argmax(dim=1)


def gather_newest(buffer: ReplayBuffer, params: Any, procs: Processes | None = None) -> NewestBatch:
    """The newest batch's groups and rewards: this process's, or every process's where
    ``params.global_std`` or ``params.group_by == "condition"`` reaches across them.
    Collective there: call it once an update on every process, whatever that process then
    trains on (a process that stops its micro-batches early must not leave a gather open)."""
    newest = buffer.newest
    rewards = buffer.rewards[newest].double()
    if params.group_by == "condition":
        ids = buffer.cond[newest].flatten()  # class or prompt indices
    else:
        ids = torch.arange(newest.shape[0]) // params.group_size
    across = params.global_std or params.group_by == "condition"
    if procs is None or procs.world == 1 or not across:
        return NewestBatch(ids, rewards, ids, rewards)
    batch_rewards, start = gather_varying(procs, rewards)
    if params.group_by == "block":  # blocks are numbered per process: number them apart
        ids = ids + start  # block ids are below the process's sample count, so these differ
    # indices are exact in float64 for the gather
    batch_ids, _ = gather_varying(procs, ids.double())
    return NewestBatch(ids, batch_rewards, batch_ids.to(ids.dtype), rewards)


def buffer_cells(buffer: ReplayBuffer, index: Tensor, step: Tensor) -> Cells:
    """The cells (slot ``index``, step ``step``) of the buffer, as its own draws return them."""

    return buffer.cells_at(index, step)


@dataclass
class CellSchedule:
    """Which cells of the newest batch a grouped method trains on next: only steps
    0..⌊T f⌋ - 1 (``timestep_fraction``), drawn with replacement (``cell_order = "random"``)
    or in passes that visit each (trajectory, step) once (``"sweep"``). A new batch starts a
    new pass; a resume does too (the pass is not checkpointed)."""

    queue: Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.long))

    @staticmethod
    def needed(params: Any) -> bool:
        """Whether the buffer's own draw (every step, with replacement) will not do: also
        where zero-advantage cells leave the mean, whose count over the update is known only
        from cells planned before its first micro-batch."""
        return (params.cell_order != "random" or params.timestep_fraction < 1
                or params.drop_zero_advantage)  # fmt: skip

    def new_batch(self) -> None:
        self.queue = self.queue[:0]

    def draw(self, buffer: ReplayBuffer, n: int, params: Any, generator: torch.Generator) -> Cells:
        position, step = self.plan(buffer, n, params, generator)
        return buffer_cells(buffer, buffer.newest[position], step)

    def plan(
        self, buffer: ReplayBuffer, n: int, params: Any, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """The next ``n`` cells as (position in the newest batch, step), not yet read."""
        newest = buffer.newest
        steps = trained_steps(buffer.num_steps, params.timestep_fraction)
        if params.cell_order == "random":
            position = torch.randint(0, newest.shape[0], (n,), generator=generator)
            step = torch.randint(0, steps, (n,), generator=generator)
            return position, step
        while self.queue.shape[0] < n:  # the next pass begins where this one ends
            self.queue = torch.cat([self.queue, sweep_order(newest.shape[0], steps, generator)])
        taken, self.queue = self.queue[:n], self.queue[n:]
        return taken[:, 0], taken[:, 1]
