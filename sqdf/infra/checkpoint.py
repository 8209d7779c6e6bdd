"""Resumable checkpoints.

A checkpoint folder holds everything needed to continue exactly: the policy weights and the
replay buffer of every process (safetensors; ``buffer.rank1.safetensors`` and so on when the
run has several processes), the optimizer state (torch.save, read back with
weights_only=True), every RNG state (our generator and torch's, CUDA's, Python's and
NumPy's), and the counters in state.json. state.json is written last and lists the SHA-256
of every other file; the folder is built under a temporary name, fsynced and renamed. A
folder whose files do not match its state.json (a torn or corrupted write) is skipped with a
message and the previous checkpoint is used.

A buffer kept on disk (``buffer_store = "disk"``) is not copied: its buffer file holds the
small part (rewards, conditions, log-probabilities, counters) and which rows of RUN/buffer/'s
memory-mapped states hold the buffer, with each row's write number. The states are flushed
before the checkpoint is written, its rows are not written again until the next one, and
resume checks the files' shape, size and write numbers (sqdf.sampling.buffer.DiskStore); rows
written after the checkpoint are free rows, overwritten by the resumed run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sqdf.infra.atomic import atomic_folder, atomic_write, fsync_path, os_error, sha256_file

PREFIX = "step_"
STATE = "state.json"
log = logging.getLogger("sqdf")


@dataclass
class Checkpoint:
    step: int
    policy: dict[str, Tensor]
    optimizer: dict[str, Any]
    buffers: list[dict[str, Tensor]]  # each process's replay buffer, in rank order
    rngs: list[Tensor]  # each process's trainer generator, in rank order
    state: dict[str, Any]  # counters
    ema: dict[str, Tensor] | None = None  # the policy's moving-average weights (--ema-decay)


def _rank_suffix(rank: int) -> str:
    # rank 0 keeps the unsuffixed names, so a one-process checkpoint reads as it always has
    return "" if rank == 0 else f".rank{rank}"


def save_weights(weights: dict[str, Tensor], path: Path) -> None:
    """Tensors as safetensors, written atomically."""
    atomic_write(Path(path), lambda tmp: write_safetensors(weights, tmp))


def load_weights(path: Path) -> dict[str, Tensor]:
    return load_file(str(path))


def _global_rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *(v for v in np_state[2:])],
    }
    return tensors, meta


def _restore_global_rng(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _slow_for_fault_tests() -> None:
    # SQDF_FAULT_CHECKPOINT_DELAY (seconds) stretches each file write, so the kill test in
    # tests/test_reliability.py can land SIGKILLs inside a save. Unset in normal use.
    delay = float(os.environ.get("SQDF_FAULT_CHECKPOINT_DELAY", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def write_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    """safetensors' save_file, its I/O failures raised as the OSError they are (safetensors
    names the cause only in its message)."""
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    except Exception as err:
        cause = os_error(err)
        if cause is None:
            raise
        raise cause from err


class _RecordingFile:
    """A file whose failed write is kept: torch.save reports one as a RuntimeError that no
    longer says why ("unexpected pos 704 vs 598")."""

    def __init__(self, fh: Any):
        self.fh, self.error = fh, None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.fh.flush()


def write_torch(obj: Any, path: Path) -> None:
    """torch.save, its I/O failures raised as the OSError they are."""
    with Path(path).open("wb") as fh:
        recording = _RecordingFile(fh)
        try:
            torch.save(obj, recording)
        except RuntimeError as err:
            if recording.error is None:
                raise
            raise recording.error from err


def checkpoint_writers(ckpt: Checkpoint) -> dict[str, Callable[[Path], None]]:
    """Each file of a checkpoint folder but state.json, and how to write it."""
    rng_tensors, rng_meta = _global_rng_state()
    generators = {f"generator{_rank_suffix(r)}": g for r, g in enumerate(ckpt.rngs)}
    writers: dict[str, Callable[[Path], None]] = {
        "policy.safetensors": lambda p: write_safetensors(ckpt.policy, p),
        "optimizer.pt": lambda p: write_torch(ckpt.optimizer, p),
        "rng.safetensors": lambda p: write_safetensors({**generators, **rng_tensors}, p),
        "rng.json": lambda p: p.write_text(json.dumps(rng_meta)),
    }
    if ckpt.ema is not None:
        writers["ema.safetensors"] = lambda p: write_safetensors(ckpt.ema, p)
    for rank, buffer in enumerate(ckpt.buffers):
        if buffer:
            name = f"buffer{_rank_suffix(rank)}.safetensors"
            writers[name] = lambda p, b=buffer: write_safetensors(b, p)
    return writers


def save_checkpoint(root: Path, ckpt: Checkpoint, keep: int) -> Path:
    """``ckpt`` as ROOT/step_NNNNNNN, built under a temporary name and renamed into place;
    the ``keep`` newest are kept. A write that fails removes the temporary folder and leaves
    the earlier checkpoints as they were; ROOT is made again if it was removed, but not the
    run folder above it (a run folder removed under a run stops it)."""
    root.mkdir(exist_ok=True)
    final = root / f"{PREFIX}{ckpt.step:07d}"
    with atomic_folder(final) as tmp:
        tmp.mkdir()
        _write_folder(tmp, ckpt)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_folder(tmp: Path, ckpt: Checkpoint) -> None:
    manifest = {}
    for name, write in checkpoint_writers(ckpt).items():
        write(tmp / name)
        fsync_path(tmp / name)
        manifest[name] = sha256_file(tmp / name)
        _slow_for_fault_tests()
    state = {"step": ckpt.step, "processes": len(ckpt.rngs), "files": manifest, **ckpt.state}
    (tmp / STATE).write_text(json.dumps(state, indent=1))
    fsync_path(tmp / STATE)
    fsync_path(tmp)


def checkpoint_bytes(ckpt: Checkpoint) -> int:
    """About the bytes ``ckpt`` takes on disk: its tensors' (the rest is small)."""
    parts = [ckpt.policy, ckpt.optimizer, ckpt.ema or {}, *ckpt.buffers]
    return sum(tensor_bytes(p) for p in parts)


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in ``obj`` (nested dicts, lists and tuples)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def list_checkpoints(root: Path) -> list[Path]:
    """Completed checkpoint folders, oldest first (temporary ones are not listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The update a checkpoint folder was written after, from its name."""
    return int(path.name[len(PREFIX) :])


def verify_checkpoint(path: Path) -> str | None:
    """None if every file matches state.json's checksums, else what is wrong."""
    try:
        state = json.loads((path / STATE).read_text())
        files = state["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "state.json is missing or unreadable"
    for name, digest in files.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if sha256_file(path / name) != digest:
            return f"{name} does not match its checksum"
    return None


def load_checkpoint(path: Path) -> Checkpoint:
    state = json.loads((path / STATE).read_text())
    state.pop("files", None)
    processes = int(state.pop("processes", 1))
    rng = load_file(str(path / "rng.safetensors"))
    generators = [f"generator{_rank_suffix(r)}" for r in range(processes)]
    _restore_global_rng(
        {k: v for k, v in rng.items() if k not in generators},
        json.loads((path / "rng.json").read_text()),
    )
    buffer_paths = [path / f"buffer{_rank_suffix(r)}.safetensors" for r in range(processes)]
    return Checkpoint(
        step=int(state.pop("step")),
        policy=load_weights(path / "policy.safetensors"),
        # map to the CPU: a run trained on a GPU may resume elsewhere; the optimizer moves its
        # state to the parameters' device when it loads it
        optimizer=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        buffers=[load_weights(b) if b.exists() else {} for b in buffer_paths],
        rngs=[rng[g] for g in generators],
        state=state,
        ema=load_weights(path / "ema.safetensors")
        if (path / "ema.safetensors").is_file()
        else None,
    )


def load_latest_checkpoint(root: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return load_checkpoint(path)
        log.warning("skipping corrupt checkpoint %s: %s", path, problem)
    return None
