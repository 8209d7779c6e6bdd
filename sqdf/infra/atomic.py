"""Crash-safe file writes: write a temporary file, fsync it, rename it over the target, fsync
the folder. A reader (or a resumed run) sees the old file or the new one, never half of one;
a write that fails removes its temporary file.

A write that fails for a cause its user can fix (a full disk or quota, a read-only or deleted
folder) becomes one line (``writing``, ``WriteError``): what could not be written, where, why,
how much space it needs and how much is free there."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path

from sqdf.errors import SqdfError

# causes a user fixes (space, permissions, a folder removed under the run), not a bug or a
# failing disk (EIO stays a traceback)
USER_FIXABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.ENOENT, errno.EFBIG}  # fmt: skip
# safetensors reports an I/O error in its message only: "... (os error 28)"
_OS_ERROR = re.compile(r"os error (\d+)")


class WriteError(SqdfError):
    """A file could not be written for a cause its user can fix; the message says what, where,
    why and what it needs."""


def os_error(err: BaseException) -> OSError | None:
    """The operating system's error behind a failed write: ``err`` itself, the one a
    safetensors error names in its message, or its explicit cause's; None if none."""
    while err is not None:
        if isinstance(err, OSError):
            return err
        found = _OS_ERROR.search(str(err))
        if found:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        err = err.__cause__
    return None


def fixable_cause(err: BaseException) -> OSError | None:
    """The operating system's error behind ``err`` when it is one the user can fix (a full
    disk or quota, a read-only or missing folder, no permission); None otherwise."""
    cause = os_error(err)
    return cause if cause is not None and cause.errno in USER_FIXABLE else None


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system of ``path`` or its nearest existing parent."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return None


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def write_error_text(what: str, where: Path, cause: OSError, needs: int | None) -> str:
    """``could not write WHAT to WHERE: WHY (it needs about N, M free there)``."""
    free = free_bytes(where)
    sizes = [f"it needs about {size_text(needs)}"] if needs else []
    sizes += [f"{size_text(free)} free there"] if free is not None else []
    why = cause.strerror or str(cause)
    return f"could not write {what} to {where}: {why}" + (f" ({', '.join(sizes)})" if sizes else "")


@contextmanager
def _one_line_writes(
    place: Callable[[OSError], tuple[str, Path, int | None] | None], then: Callable[[], str]
) -> Iterator[None]:
    """A failure inside the block whose cause the user can fix, and that ``place`` names
    (what, where, bytes needed; None: not a write of ours), becomes one ``WriteError`` with
    ``then()`` after it; other errors pass as they are."""
    try:
        yield
    except WriteError:
        raise
    except Exception as err:
        cause = fixable_cause(err)
        found = place(cause) if cause is not None else None
        if cause is None or found is None:
            raise
        what, where, needs = found
        raise WriteError(write_error_text(what, where, cause, needs) + then()) from None


def writing(
    what: str, where: Path, needs: int | None = None, then: Callable[[], str] = str
) -> AbstractContextManager[None]:
    """A failed write inside the block becomes a ``WriteError`` (one line, ``then()`` after
    it: what was kept and how to go on, read after the failure) when its cause is one the user
    can fix; other errors pass as they are."""
    return _one_line_writes(lambda cause: (what, where, needs), then)


def make_folder(path: Path, what: str) -> None:
    """Make the folder ``path`` and its parents, or stop with one line naming it when that
    cannot be (a file in the way, a read-only or pseudo file system such as /proc, no
    permission)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SqdfError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SqdfError(f"cannot make {what} {path}: {err.strerror or err}") from None


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
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with suppress(OSError):  # a folder removed or made read-only meanwhile
            tmp.unlink(missing_ok=True)
        cause = os_error(err)
        if cause is not None and cause is not err:  # e.g. safetensors' "os error 28"
            raise cause from err
        raise
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextmanager
def atomic_folder(path: Path, owner: bool = True) -> Iterator[Path]:
    """A folder built whole or not at all: the block fills the temporary sibling it is given
    (``.tmp-NAME``), which then replaces ``path`` and the parent is flushed; if the block
    fails, the temporary folder is removed and ``path`` stays as it was. ``owner`` False (a
    process that takes part in a collective write but does not write) touches nothing."""
    tmp = path.with_name(f".tmp-{path.name}")
    if owner:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if owner:
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    except BaseException:
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if owner:
        fsync_path(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# causes that only a write meets: any file's, wherever it is
_WRITE_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def folder_writes(folder: Path, then: Callable[[], str] = str) -> AbstractContextManager[None]:
    """A write the block fails (a file in ``folder``, or any file on a full or read-only disk)
    as one ``WriteError`` naming the file, ``then()`` after it (what was kept and how to go
    on); a missing or unreadable file elsewhere is not a write and passes as it is."""

    def place(cause: OSError) -> tuple[str, Path, None] | None:
        path = Path(cause.filename) if isinstance(cause.filename, (str, Path)) else None
        inside = path is not None and Path(folder).resolve() in (
            path.resolve(),
            *path.resolve().parents,
        )
        if cause.errno not in _WRITE_ONLY and not inside:
            return None
        if path is None:
            return "a file", Path(folder), None
        return path.name.removeprefix(".tmp-"), path.parent, None  # atomic_write's temp name

    return _one_line_writes(place, then)
