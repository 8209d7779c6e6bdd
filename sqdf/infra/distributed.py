"""Several processes through Hugging Face Accelerate: who is who, and the few collectives the
trainer needs.

Launch any training command with ``accelerate launch`` or ``torchrun``; each process samples
its own trajectories (its own seed, derived from the run's), keeps its own replay buffer and
computes its rewards where its samples are. Once per update the processes average their
gradients and sum their counters; everything else stays local. The main process alone
writes files and shows progress.

Why the gradients are averaged with one all-reduce of our own instead of a DDP wrapper: a
method's loss runs the policy several times before one backward (DRaFT-K, AlignProp, the
reference mean with the LoRA adapter disabled), which DDP's one-forward-per-backward
bookkeeping does not fit. All gradients travel in one flat tensor, one all-reduce per update
(not one per micro-batch), which is what DDP with ``no_sync`` over the accumulation does.
CPU tensors (counters, statistics, buffers, random states) travel over a gloo group of their
own where the launcher's backend is NCCL, which has none for them.

FSDP (an Accelerate config with ``distributed_type: FSDP``, ``fsdp_version: 2``): the policy
network is sharded by Accelerate's FSDP2 (``fully_shard``, which allows several forwards
before a backward); FSDP then averages the gradients itself, the norm is clipped across
shards, and the weights and optimizer state are gathered whole for checkpoints and the final
weights, so a run written under FSDP resumes without it and the other way round. Accelerate
ignores an FSDP config when it runs on CPUs (it falls back to all-reduce); FSDP2 itself works
over gloo, so on CPUs sqdf sets Accelerate's distributed type to FSDP for it, which is how the
FSDP path is tested without a GPU.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

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
        self._cpu_group = None
        self.rank, self.world = 0, 1
        # one process under an FSDP config is still FSDP (e.g. to offload to the CPU)
        if launched()[1] > 1 or (_fsdp_requested() and "RANK" in os.environ):
            from accelerate import Accelerator

            if device not in ("auto", "cpu"):
                raise ConfigError(
                    f"device {device!r} cannot be used with several processes: each process "
                    "gets its GPU from the launcher; use device auto (or cpu)"
                )
            # without a GPU Accelerate must be told so, or it runs each process alone
            cpu = device == "cpu" or not torch.cuda.is_available()
            self._acc = Accelerator(cpu=cpu)
            if _fsdp_requested():
                _use_fsdp2(self._acc)
            # a process that exits with its gloo group alive can abort in the group's
            # destructor ("terminate called without an active exception"); the launcher then
            # kills the others mid-write
            atexit.register(_destroy_group)
            self.rank, self.world = self._acc.process_index, self._acc.num_processes
            self._cpu_group = _cpu_group()
            if self.world != launched()[1]:
                raise ConfigError(
                    f"the launcher started {launched()[1]} processes but Accelerate joined "
                    f"{self.world}; check the launch command (see the README's Multi-GPU section)"
                )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        """Whether the policy is sharded (FSDP2) rather than replicated."""
        if self._acc is None:
            return False
        from accelerate.utils import DistributedType

        return self._acc.distributed_type == DistributedType.FSDP

    def prepare(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> list[torch.nn.Parameter]:
        """Shard ``model`` under FSDP (in place: the task keeps calling the same module) and
        point ``optimizer`` at the shards; returns the trainable parameters to clip."""
        if self.fsdp:
            self._acc.prepare(model, optimizer)
        return [p for p in model.parameters() if p.requires_grad]

    def clip(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Clip the (already averaged) gradients to ``max_norm`` (0 = no clipping); returns
        their norm before clipping, the same in every process."""
        limit = max_norm if max_norm > 0 else float("inf")
        if self.fsdp:  # a norm over every process's shards
            norm = self._acc.clip_grad_norm_(params, limit)
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        return float(torch.nn.utils.clip_grad_norm_(params, limit))

    def model_state(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """The whole state dict; under FSDP every process must call this, and only the main
        one receives it (on the CPU; the others get an empty dict)."""
        if not self.fsdp:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        # the gathering may still be in flight in the others: a process that left now would
        # destroy its group under pending work and abort ("terminate called without an
        # active exception"), which a bare script ending here did 2 times in 6
        self.barrier()
        return state

    def load_model_state(self, model: torch.nn.Module, state: dict[str, Tensor]) -> None:
        if not self.fsdp:
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def optimizer_state(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        """``optimizer.state_dict()`` as one process holds it unsharded (parameters numbered
        in the order of the model's trainable parameters); collective under FSDP, where only
        the main process receives it."""
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        by_name = get_optimizer_state_dict(model, optimizer, options=options)
        self.barrier()  # as in model_state: no process leaves with the gathering in flight
        if not by_name:  # with cpu_offload only the main process receives the whole state
            return {}
        index = {name: i for i, name in enumerate(_trainable_names(model))}
        return {
            "state": {index[n]: v for n, v in by_name["state"].items()},
            "param_groups": [
                {**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]
            ],
        }

    def load_optimizer_state(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        names = _trainable_names(model)
        by_name = {
            "state": {names[int(i)]: v for i, v in state["state"].items()},
            "param_groups": [
                {**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]
            ],
        }
        set_optimizer_state_dict(
            model, optimizer, by_name, options=StateDictOptions(full_state_dict=True)
        )

    def device(self, requested: str) -> str:
        """The device this process computes on: the launcher's choice when launched."""
        return requested if self._acc is None else str(self._acc.device)

    def _group(self, t: Tensor) -> Any:
        # CPU tensors (counters, buffers, random states) travel over gloo: NCCL, the GPUs'
        # backend, has none for them; GPU tensors (gradients) over the launcher's group
        return self._cpu_group if t.device.type == "cpu" else None

    def sum(self, t: Tensor) -> Tensor:
        """Every process's ``t`` summed (a new tensor; ``t`` is left as it was)."""
        if self._acc is None:
            return t
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self._group(t))
        return out

    def mean(self, t: Tensor) -> Tensor:
        return t if self._acc is None else self.sum(t) / self.world

    def gather(self, t: Tensor, main_only: bool = False) -> Tensor:
        """(world, *t.shape): every process's ``t``, stacked in rank order; with
        ``main_only`` only the main process receives them (the others get ``t`` alone: no
        process but the one that writes holds every process's copy)."""
        t = t.unsqueeze(0).contiguous()
        if self._acc is None:
            return t
        import torch.distributed as dist

        group = self._group(t)
        if main_only:
            parts = [torch.empty_like(t) for _ in range(self.world)] if self.is_main else None
            dist.gather(t, parts, dst=0, group=group)
            return torch.cat(parts) if self.is_main else t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=group)
        return torch.cat(parts)

    def barrier(self) -> None:
        if self._acc is not None:
            import torch.distributed as dist

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # this process's GPU work (NCCL's included) is done
            dist.barrier(group=self._cpu_group)  # over gloo: needs no device of its own


def _fsdp_requested() -> bool:
    # what accelerate launch sets from a config with distributed_type: FSDP (or --use_fsdp)
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _use_fsdp2(acc: Any) -> None:
    """Check the FSDP settings; on CPUs, where Accelerate ignores them, turn its FSDP2 path on."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if acc.distributed_type != DistributedType.FSDP:  # CPUs: Accelerate fell back to all-reduce
        # both shared states, as Accelerate itself records an FSDP choice (a later
        # AcceleratorState() copies PartialState's type over its own)
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the launch env
    if acc.state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError(
            f"sqdf shards with FSDP2: set fsdp_version: 2 in the accelerate config (got "
            f"{acc.state.fsdp_plugin.fsdp_version}); FSDP1 cannot run the several policy "
            "forwards a loss makes before its backward"
        )


def _trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters as FSDP2 reports them (no wrapper prefixes)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def end_process(code: int) -> NoReturn:
    """End a launched process: flush, leave the process group, and exit without running C++
    static destructors. A clean exit through the interpreter aborted now and then after
    Python was gone ("terminate called without an active exception", no Python frame left,
    about 1 launch in 30 under pytest), and the launcher then killed the other processes;
    everything the run writes is fsynced before this point."""
    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    _destroy_group()
    os._exit(code)


_CPU_GROUP: list[Any] = []  # the gloo group of this process group's lifetime, once made


def _cpu_group() -> Any:
    """A group for CPU tensors: the launcher's own where its backend is gloo, else a gloo
    group beside it, made once (every process makes it at the same point, as it must)."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    if not _CPU_GROUP:
        _CPU_GROUP.append(dist.new_group(backend="gloo"))
    return _CPU_GROUP[0]


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP.clear()


def rank_seed(seed: int, rank: int, start: int = 0) -> int:
    """The seed of process ``rank``: the run's own for rank 0 (so one process reproduces a
    run made before scale-out), an independent stream derived from (seed, rank) otherwise;
    ``start`` > 0 for a process that joins a resumed run at that update."""
    if rank == 0 and start == 0:
        return seed
    words = np.random.SeedSequence([seed, rank, start]).generate_state(1, dtype=np.uint64)
    return int(words[0] >> 1)


def process_change(saved: int, now: int, shared: bool = False) -> str:
    """What resuming a ``saved``-process checkpoint on ``now`` processes does to the buffers
    (a ``shared`` buffer: every process loads the one union) and random streams."""
    streams = f"processes 0..{min(saved, now) - 1} continue with their random streams"
    if shared:
        return (
            f"resuming a {saved}-process run on {now} processes: every process loads the "
            f"shared buffer; {streams}"
            + (f", processes {saved}..{now - 1} start new ones" if now > saved else "")
        )
    fate = (
        f"processes {saved}..{now - 1} start with empty buffers"
        if now > saved
        else f"the buffers of processes {now}..{saved - 1} are dropped"
    )
    return (
        f"resuming a {saved}-process run on {now} processes: processes 0..{min(saved, now) - 1} "
        f"continue with their buffers and random streams; {fate}"
    )


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


def all_gather_rows(procs: Processes, fields: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every process's ``fields`` joined along their first dimension, in rank order, in every
    process (each field's first dimension is the same within a process, any length across
    processes; the other dimensions agree). Padded to the longest to travel."""
    if procs.world == 1:
        return dict(fields)
    rows = next(iter(fields.values())).shape[0]
    lengths = procs.gather(torch.tensor(rows)).tolist()
    out = {}
    for key in sorted(fields):
        t = fields[key].contiguous()
        pad = max(lengths) - t.shape[0]
        if pad:
            t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
        stacked = procs.gather(t)
        out[key] = torch.cat([stacked[r, :n] for r, n in enumerate(lengths)])
    return out


def gather_states(procs: Processes, state: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """Every process's ``state`` (same keys everywhere, first dimensions may differ), in rank
    order, for the main process to save (the others get an empty list: a replay buffer can
    be gigabytes, and only the main process writes). Tensors are padded to a common length
    to travel."""
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
        stacked = procs.gather(t, main_only=True)
        if not procs.is_main:
            continue
        for rank, n in enumerate(lengths):
            out[rank][key] = stacked[rank, 0] if scalar else stacked[rank, :n].clone()
    return out if procs.is_main else []
