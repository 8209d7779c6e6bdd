"""Resumable checkpoints: weights and buffer as safetensors, optimizer via torch.save (loaded
with weights_only=True), RNG state as a tensor, counters as JSON. Written to a temporary
folder and renamed, so a crash never leaves a half-written checkpoint behind."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

PREFIX = "step_"


@dataclass
class Checkpoint:
    step: int
    policy: dict[str, Tensor]
    optimizer: dict[str, Any]
    buffer: dict[str, Tensor]
    rng: Tensor
    state: dict[str, Any]


def save_weights(weights: dict[str, Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(path))


def load_weights(path: Path) -> dict[str, Tensor]:
    return load_file(str(path))


def save_checkpoint(root: Path, ckpt: Checkpoint, keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{ckpt.step:07d}"
    tmp = root / f".tmp-{PREFIX}{ckpt.step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(ckpt.policy, tmp / "policy.safetensors")
    torch.save(ckpt.optimizer, tmp / "optimizer.pt")
    if ckpt.buffer:
        save_weights(ckpt.buffer, tmp / "buffer.safetensors")
    save_file({"generator": ckpt.rng}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": ckpt.step, **ckpt.state}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def load_checkpoint(path: Path) -> Checkpoint:
    state = json.loads((path / "state.json").read_text())
    buffer_path = path / "buffer.safetensors"
    return Checkpoint(
        step=int(state.pop("step")),
        policy=load_weights(path / "policy.safetensors"),
        # map to the CPU: a run trained on a GPU may resume elsewhere; the optimizer moves its
        # state to the parameters' device when it loads it
        optimizer=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        buffer=load_weights(buffer_path) if buffer_path.exists() else {},
        rng=load_file(str(path / "rng.safetensors"))["generator"],
        state=state,
    )
