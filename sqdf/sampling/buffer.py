"""Replay buffer of past trajectories; each update draws (trajectory, step) cells from it.

Strategies (how a cell is chosen):
- ``uniform``: any step of any stored trajectory, equally likely;
- ``on_policy``: only trajectories of the newest batch;
- ``prioritized``: cell (i, k) with weight r_i * gamma^(T-1-k). The paper's weight assumes
  non-negative rewards; when the buffer holds a negative one, all rewards are shifted by the
  buffer's minimum first (a documented choice), otherwise they are used as they are.

Stores (where the states live, the one large part: capacity x (T+1) x D values):
- ``MemoryStore``: a host tensor, saved whole in every checkpoint;
- ``DiskStore``: memory-mapped .npy files in the run folder (RUN/buffer/), written as
  trajectories are added; the host keeps only the pages it reads, and a checkpoint records
  which rows hold the buffer instead of copying them.
Either keeps the states in a chosen dtype (bfloat16 and float16 halve float32's bytes) and
gives cells back in float32 (what the sampler produces and the losses compute in). Which
cells are drawn is the buffer's choice alone: the same generator draws the same cells from
either store.
"""

from __future__ import annotations

import errno
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sqdf.errors import SqdfError
from sqdf.infra.atomic import fsync_path
from sqdf.sampling.sampler import Trajectories

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF = (torch.bfloat16, torch.float16)


@dataclass
class Cells:
    x_t: Tensor  # (B, ...) state before step k
    x_next: Tensor | None  # (B, ...) state the sampler reached after step k (None: truncated)
    step: Tensor  # (B,) long, k in 0..T-1
    cond: Tensor  # (B,)
    reward: Tensor  # (B,) reward of the trajectory's final sample
    index: Tensor  # (B,) slot in the buffer
    logp: Tensor | None = None  # (B,) log-likelihood of x_next under the sampling policy


def _widen(x: Tensor) -> Tensor:
    return x.float() if x.dtype in HALF else x


class MemoryStore:
    """The states in one host tensor, (capacity, T+1, ...), in ``dtype`` (None: as the first
    trajectories added are)."""

    on_disk = False

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype
        self.states: Tensor | None = None

    def allocate(self, capacity: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.dtype = self.dtype or dtype
        self.states = torch.zeros((capacity, *shape), dtype=self.dtype)

    def write(self, slots: Tensor, states: Tensor) -> None:
        self.states[slots] = states.to(self.dtype)

    def read(self, slots: Tensor, steps: Tensor) -> Tensor:
        return self.states[slots, steps]

    def all(self) -> Tensor:
        return self.states

    def state_dict(self) -> dict[str, Tensor]:
        return {"states": self.states}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "states" not in state:
            raise SqdfError(
                "cannot resume the replay buffer: the checkpoint keeps its states on disk "
                "(buffer_store disk), this run in memory"
            )
        self.dtype = self.dtype or state["states"].dtype
        self.states = state["states"].to(self.dtype, copy=True)


def _as_numpy(x: Tensor) -> np.ndarray:
    # NumPy has no bfloat16: its bits travel as int16
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()


def _as_torch(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    x = torch.from_numpy(np.asarray(a))
    return x.view(torch.bfloat16) if dtype == torch.bfloat16 else x


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return _as_numpy(torch.empty(0, dtype=dtype)).dtype


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.bfloat16 if dtype == np.int16 else torch.from_numpy(np.empty(0, dtype)).dtype


class DiskStore:
    """The states in ``folder``/states.npy (rank r > 0: states.rank<r>.npy), memory-mapped, in
    ``dtype`` (bfloat16 as its bits, int16 in the file's header); beside it tags.npy, each
    row's write number.

    A checkpoint names the rows that hold the buffer (``state_dict``); those rows are not
    written again until the next checkpoint, so a run that stops after it finds them as they
    were, whatever it added since. Hence twice the capacity in rows: the buffer's own, and
    room for new trajectories while the checkpoint's are kept. New trajectories take the
    lowest free rows. The files' blocks are reserved when they are made (``reserve``), so they
    take twice the buffer's bytes on disk from the start, and a full disk is an error then,
    not a crash at an arbitrary later write. A row is
    tagged with its write number before its states are written: rows that an older checkpoint
    (the fallback when the newest is corrupt) names but were written since are refused on
    resume, not replayed as the wrong trajectories.
    """

    on_disk = True

    def __init__(self, folder: Path, dtype: torch.dtype | None = None, rank: int = 0):
        suffix = "" if rank == 0 else f".rank{rank}"
        self.folder = Path(folder)
        self.path = self.folder / f"states{suffix}.npy"
        self.tags_path = self.folder / f"tags{suffix}.npy"
        self.dtype = dtype
        self.states: np.memmap | None = None  # (2 x capacity, T+1, ...)
        self.tags: np.memmap | None = None  # (2 x capacity,) int64; 0: never written
        self.rows = torch.zeros(0, dtype=torch.long)  # (capacity,) slot -> row; -1: empty
        self.row_tags = torch.zeros(0, dtype=torch.long)  # (capacity,) each slot's write number
        self.pinned = torch.zeros(0, dtype=torch.long)  # rows the last checkpoint names
        self.writes = 0

    def allocate(self, capacity: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.dtype = self.dtype or dtype
        self.folder.mkdir(parents=True, exist_ok=True)
        open_memmap = np.lib.format.open_memmap
        dt = _numpy_dtype(self.dtype)
        self.states = open_memmap(self.path, "w+", dt, (2 * capacity, *shape))
        self.tags = open_memmap(self.tags_path, "w+", np.int64, (2 * capacity,))
        for path in (self.path, self.tags_path):
            reserve(path)
        fsync_path(self.folder)  # the files outlive a crash: a checkpoint will refer to them
        self.rows = torch.full((capacity,), -1, dtype=torch.long)
        self.row_tags = torch.zeros(capacity, dtype=torch.long)
        self.pinned = torch.zeros(0, dtype=torch.long)
        self.writes = 0

    def write(self, slots: Tensor, states: Tensor) -> None:
        taken = torch.zeros(self.tags.shape[0], dtype=torch.bool)
        others = torch.ones(self.rows.shape[0], dtype=torch.bool)
        others[slots] = False
        held = self.rows[others]
        taken[held[held >= 0]] = True
        taken[self.pinned] = True
        # at most capacity - n rows held by other slots and capacity pinned: n are free
        rows = (~taken).nonzero().squeeze(1)[: slots.shape[0]]
        tags = self.writes + 1 + torch.arange(slots.shape[0])
        self.tags[rows.numpy()] = tags.numpy()  # first: a torn write never matches its old tag
        self.states[rows.numpy()] = _as_numpy(states.to(self.dtype).contiguous())
        self.rows[slots], self.row_tags[slots] = rows, tags
        self.writes += slots.shape[0]

    def read(self, slots: Tensor, steps: Tensor) -> Tensor:
        return _as_torch(self.states[self.rows[slots].numpy(), steps.numpy()], self.dtype)

    def all(self) -> Tensor:
        """Every slot's states, in slot order (a copy read from the file; zeros if empty)."""
        x = torch.zeros((self.rows.shape[0], *self.states.shape[1:]), dtype=self.dtype)
        used = self.rows >= 0
        x[used] = _as_torch(self.states[self.rows[used].numpy()], self.dtype)
        return x

    def state_dict(self) -> dict[str, Tensor]:
        """The rows in use and their write numbers, with the files flushed to disk; from now
        on (until the next call) those rows are not written again."""
        self.states.flush()
        self.tags.flush()
        self.pinned = self.rows[self.rows >= 0].clone()
        return {
            "rows": self.rows.clone(),
            "row_tags": self.row_tags.clone(),
            "writes": torch.tensor([self.writes]),
            "shard_shape": torch.tensor(self.states.shape),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "rows" not in state:
            raise SqdfError(
                "cannot resume the replay buffer: the checkpoint keeps its states in memory "
                f"(buffer_store memory), this run in {self.folder}"
            )
        shape = tuple(int(v) for v in state["shard_shape"])
        numpy_dtype = None if self.dtype is None else _numpy_dtype(self.dtype)
        self.states = _open_shard(self.path, shape, numpy_dtype)
        self.tags = _open_shard(self.tags_path, shape[:1], np.dtype(np.int64))
        self.dtype = self.dtype or _torch_dtype(self.states.dtype)
        self.rows = state["rows"].clone()
        self.row_tags = state["row_tags"].clone()
        self.writes = int(state["writes"][0])
        used = self.rows >= 0
        on_file = torch.from_numpy(np.asarray(self.tags[self.rows[used].numpy()]))
        stale = int((on_file != self.row_tags[used]).sum())
        if stale:
            raise SqdfError(
                f"cannot resume the replay buffer: {stale} of the {int(used.sum())} "
                f"trajectories the checkpoint names in {self.path} were overwritten after it "
                "(a disk buffer keeps the rows of the newest checkpoint only, so an older one "
                "cannot be resumed; if the newest was unreadable, train the run again)"
            )
        self.pinned = self.rows[used].clone()


def reserve(path: Path) -> None:
    """Allocate every block of ``path`` now: a memory-mapped write into a hole the file
    system cannot fill kills the process (SIGBUS) instead of raising. A file system without
    the call (EOPNOTSUPP, EINVAL) is left as it is."""
    size = path.stat().st_size
    try:
        with path.open("r+b") as fh:
            os.posix_fallocate(fh.fileno(), 0, size)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return
        raise SqdfError(
            f"cannot reserve {size / 2**30:.2f} GiB for the replay buffer's {path}: "
            f"{err.strerror} (buffer_store disk needs twice the buffer's bytes)"
        ) from None


def _open_shard(path: Path, shape: tuple[int, ...], dtype: np.dtype | None) -> np.memmap:
    """``path`` memory-mapped for reading and writing, after checking that it is there and
    whole and holds ``shape`` of ``dtype`` (None: any); a clear SqdfError naming it if not."""
    if not path.is_file():
        raise SqdfError(f"cannot resume the replay buffer: its shard {path} is missing")
    fmt = np.lib.format
    try:
        with path.open("rb") as fh:
            version = fmt.read_magic(fh)
            read_header = (
                fmt.read_array_header_1_0 if version == (1, 0) else (fmt.read_array_header_2_0)
            )
            found_shape, _, found_dtype = read_header(fh)
            offset = fh.tell()
    except ValueError as err:
        raise SqdfError(
            f"cannot resume the replay buffer: {path} is not a .npy file ({err})"
        ) from None
    if found_shape != shape or (dtype is not None and found_dtype != dtype):
        raise SqdfError(
            f"cannot resume the replay buffer: {path} holds {found_shape} {found_dtype}, the "
            f"checkpoint expects {shape} {dtype or found_dtype}"
        )
    expected = offset + math.prod(shape) * found_dtype.itemsize
    size = os.path.getsize(path)
    if size != expected:
        raise SqdfError(
            f"cannot resume the replay buffer: {path} is truncated ({size:,} bytes, "
            f"{expected:,} expected)"
        )
    return fmt.open_memmap(path, mode="r+")


class ReplayBuffer:
    """A ring of ``capacity`` trajectories (the oldest overwritten first), their states in
    ``store`` (default: host memory, in the dtype of the first trajectories added)."""

    def __init__(
        self,
        capacity: int,
        strategy: str,
        num_steps: int,
        gamma: float,
        store: MemoryStore | DiskStore | None = None,
    ):
        if strategy not in ("uniform", "on_policy", "prioritized"):
            raise ValueError(f"unknown buffer strategy {strategy!r}")
        self.capacity = capacity
        self.strategy = strategy
        self.num_steps = num_steps
        self.gamma = gamma
        self.store = store if store is not None else MemoryStore()
        self.cond: Tensor | None = None
        self.rewards = torch.zeros(capacity)
        self.logp: Tensor | None = None  # (capacity, T)
        self.size = 0
        self.ptr = 0
        self.newest = torch.zeros(0, dtype=torch.long)

    @property
    def states(self) -> Tensor | None:
        """(capacity, T+1, ...) every slot's states (a disk store's: a copy); None if empty."""
        return None if self.cond is None else self.store.all()

    def add(self, traj: Trajectories, rewards: Tensor) -> None:
        n = traj.states.shape[0]
        if n > self.capacity:
            raise ValueError(f"batch of {n} trajectories exceeds buffer capacity {self.capacity}")
        if self.cond is None:
            self.store.allocate(self.capacity, tuple(traj.states.shape[1:]), traj.states.dtype)
            self.cond = torch.zeros((self.capacity, *traj.cond.shape[1:]), dtype=traj.cond.dtype)
            self.logp = torch.zeros((self.capacity, self.num_steps))
        idx = (self.ptr + torch.arange(n)) % self.capacity
        self.store.write(idx, traj.states)
        self.cond[idx] = traj.cond
        if traj.logp is not None:
            self.logp[idx] = traj.logp.float()
        self.rewards[idx] = rewards.detach().float().cpu()
        self.ptr = int((self.ptr + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)
        self.newest = idx

    def sample_cells(self, n: int, generator: torch.Generator) -> Cells:
        if self.size == 0:
            raise RuntimeError("sample_cells on an empty buffer")
        T = self.num_steps
        if self.strategy == "prioritized":
            r = self.rewards[: self.size]
            shifted = r - min(float(r.min()), 0.0) + 1e-6
            disc = self.gamma ** (T - 1 - torch.arange(T, dtype=torch.float64))
            w = (shifted.double()[:, None] * disc[None]).flatten()
            flat = torch.multinomial(w, n, replacement=True, generator=generator)
            index, step = flat // T, flat % T
        else:
            pool = self.newest if self.strategy == "on_policy" else torch.arange(self.size)
            index = pool[torch.randint(0, pool.shape[0], (n,), generator=generator)]
            step = torch.randint(0, T, (n,), generator=generator)
        return self.cells_at(index, step)

    def cells_at(self, index: Tensor, step: Tensor) -> Cells:
        """The cells (trajectory ``index``, step ``step``) of the buffer, states in float32."""
        return Cells(
            x_t=_widen(self.store.read(index, step)),
            x_next=_widen(self.store.read(index, step + 1)),
            step=step,
            cond=self.cond[index],
            reward=self.rewards[index],
            index=index,
            logp=self.logp[index, step],
        )

    def state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint keeps: everything (memory store), or everything but the states,
        flushed to their files (disk store)."""
        if self.cond is None:
            return {}
        return {
            **self.store.state_dict(),
            "cond": self.cond,
            "rewards": self.rewards,
            "logp": self.logp,
            "newest": self.newest,
            "size_ptr": torch.tensor([self.size, self.ptr]),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not state:
            return
        self.store.load_state_dict(state)
        self.cond = state["cond"].clone()
        self.rewards = state["rewards"].clone()
        self.logp = state["logp"].clone()
        self.newest = state["newest"].clone()
        self.size, self.ptr = (int(v) for v in state["size_ptr"])
