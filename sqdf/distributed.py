"""Several processes through Hugging Face Accelerate: who is who, and the few collectives the
trainer needs.

Launch any training command with ``accelerate launch`` or ``torchrun``; each process samples
its own trajectories (its own seed, derived from the run's), keeps its own replay buffer and
computes its rewards where its samples are. Once per update the processes average their
gradients and sum their counters; everything else stays local. The main process alone
writes files and shows progress.

Why the gradients are averaged with Accelerate's ``reduce`` instead of a DDP wrapper: a
method's loss runs the policy several times before one backward (DRaFT-K, AlignProp, the
reference mean with the LoRA adapter disabled), which DDP's one-forward-per-backward
bookkeeping does not fit. All gradients travel in one flat tensor, one all-reduce per update
(not one per micro-batch), which is what DDP with ``no_sync`` over the accumulation does.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from sqdf.errors import ConfigError, SqdfError


def launched() -> tuple[int, int]:
    """(rank, world size) as the launcher (accelerate launch, torchrun) set them; (0, 1) when
    not launched. Readable before any process group exists."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class Processes:
    """This process's place among the launched ones (one process when not launched)."""

    def __init__(self, device: str = "auto"):
        self._acc = None
        self.rank, self.world = 0, 1
        if launched()[1] > 1:
            from accelerate import Accelerator

            if device not in ("auto", "cpu"):
                raise ConfigError(
                    f"device {device!r} cannot be used with several processes: each process "
                    "gets its GPU from the launcher; use device auto (or cpu)"
                )
            # without a GPU Accelerate must be told so, or it runs each process alone
            cpu = device == "cpu" or not torch.cuda.is_available()
            self._acc = Accelerator(cpu=cpu)
            # a process that exits with its gloo group alive can abort in the group's
            # destructor ("terminate called without an active exception"); the launcher then
            # kills the others mid-write
            atexit.register(_destroy_group)
            self.rank, self.world = self._acc.process_index, self._acc.num_processes
            if self.world != launched()[1]:
                raise ConfigError(
                    f"the launcher started {launched()[1]} processes but Accelerate joined "
                    f"{self.world}; check the launch command (see the README's Multi-GPU section)"
                )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """The device this process computes on: the launcher's choice when launched."""
        return requested if self._acc is None else str(self._acc.device)

    def mean(self, t: Tensor) -> Tensor:
        return t if self._acc is None else self._acc.reduce(t, reduction="mean")

    def sum(self, t: Tensor) -> Tensor:
        return t if self._acc is None else self._acc.reduce(t, reduction="sum")

    def gather(self, t: Tensor) -> Tensor:
        """(world, *t.shape): every process's ``t``, stacked in rank order."""
        t = t.unsqueeze(0)
        return t if self._acc is None else self._acc.gather(t.contiguous())

    def barrier(self) -> None:
        if self._acc is not None:
            self._acc.wait_for_everyone()


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int, start: int = 0) -> int:
    """The seed of process ``rank``: the run's own for rank 0 (so one process reproduces a
    run made before scale-out), an independent stream derived from (seed, rank) otherwise;
    ``start`` > 0 for a process that joins a resumed run at that update."""
    if rank == 0 and start == 0:
        return seed
    words = np.random.SeedSequence([seed, rank, start]).generate_state(1, dtype=np.uint64)
    return int(words[0] >> 1)


def average_gradients(procs: Processes, params: Iterable[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over processes, in one flat all-reduce."""
    if procs.world == 1:
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = procs.mean(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def gather_states(procs: Processes, state: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """Every process's ``state`` (same keys everywhere, first dimensions may differ), in rank
    order, for the main process to save. Tensors are padded to a common length to travel."""
    if procs.world == 1:
        return [state]
    sizes = procs.gather(torch.tensor(len(state))).tolist()
    if len(set(sizes)) > 1:  # a process whose buffer is still empty: all raise together
        raise SqdfError(
            f"cannot checkpoint: processes hold {sizes} buffer fields (some have stored no "
            "sample with a finite reward yet)"
        )
    out: list[dict[str, Tensor]] = [{} for _ in range(procs.world)]
    for key in sorted(state):
        t = state[key]
        scalar = t.dim() == 0
        t = t.reshape(1) if scalar else t
        lengths = procs.gather(torch.tensor(t.shape[0])).tolist()
        pad = max(lengths) - t.shape[0]
        if pad:
            t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
        stacked = procs.gather(t)
        for rank, n in enumerate(lengths):
            out[rank][key] = stacked[rank, 0] if scalar else stacked[rank, :n].clone()
    return out
