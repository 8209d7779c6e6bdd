"""Crash-safe file writes: write a temporary file, fsync it, rename it over the target, fsync
the folder. A reader (or a resumed run) sees the old file or the new one, never half of one."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Produce ``path`` by ``write(tmp)`` on a temporary sibling, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
