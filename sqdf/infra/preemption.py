"""Stopping on a signal: what a cluster sends before it takes the machine back.

SLURM and Kubernetes send SIGTERM (SLURM can send SIGUSR1 ahead, with ``--signal``) and
SIGKILL after a grace period; a user presses Ctrl-C (SIGINT). While a run is inside
``stop_on_signals``, the first of these only records its number: the training loop reads it
after each update (``agreed_signal``: one all-reduce, so every process stops after the same
update), writes a checkpoint and raises ``Preempted``; the command prints its one line and
exits with 128 + the signal's number, as a shell reports a process the signal ended. A second
signal ends the process at once (the checkpoints are written atomically, so the newest
complete one stays usable), except a repeat of the first under a launcher (``_record``). A
signal that arrives after the last look, once the work is saved, is delivered again when the
block ends.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """A run stopped on a signal after saving what it needs to continue; ``str()`` is the
    line to print, ``code`` the exit status (128 + the signal's number)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def code(self) -> int:
        return 128 + self.signum


_received: list[int] = []  # the first signal's number, while inside stop_on_signals
_depth = [0]  # nested stop_on_signals (a compare's trainings): the outermost installs


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def under_launcher() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process: it forwards a
    SIGTERM it receives to its workers, and kills them itself after its own grace period."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def _record(signum: int, frame: Any) -> None:
    if _received:
        # SLURM signals every process of a job step, and torchrun passes its own copy on:
        # under a launcher the same signal twice is one preemption (the launcher's SIGKILL
        # ends a stop that takes too long); anywhere else a second signal stops at once.
        if signum == _received[0] and under_launcher():
            return
        os.write(2, f"sqdf: second {signal_name(signum)}: stopping at once\n".encode())
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received.append(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM, SIGINT and SIGUSR1 recorded, not acted on, inside the block (the previous
    handlers back after it). Nested blocks share the outermost's record; off the main thread,
    where Python cannot take signals, the block changes nothing."""
    outermost = _depth[0] == 0 and threading.current_thread() is threading.main_thread()
    before = {s: signal.signal(s, _record) for s in SIGNALS} if outermost else {}
    _depth[0] += 1
    finished = False
    try:
        yield
        finished = True
    finally:
        _depth[0] -= 1
        for s, handler in before.items():  # None: a handler not set from Python
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        late = _received[0] if outermost and finished and _received else None
        if outermost:
            _received.clear()
    if late is not None:
        # a signal after the loop's last look (the final write, a report): the work is done
        # and saved, so it now does what it would have done outside the block
        signal.raise_signal(late)


def received() -> int | None:
    """The number of the signal this process received inside ``stop_on_signals`` (None: none)."""
    return _received[0] if _received else None


def agreed_signal(procs: Any) -> int | None:
    """The signal any process received (the first of SIGNALS where they differ), the same in
    every process: collective, one small all-reduce (nothing to reduce on one process)."""
    mine = received()
    if procs.world == 1:
        return mine
    flags = torch.tensor([float(mine == s) for s in SIGNALS], dtype=torch.float64)
    total = procs.sum(flags).tolist()
    return next((int(s) for s, n in zip(SIGNALS, total, strict=True) if n > 0), None)


def stop_here_if_signalled(procs: Any, where: str) -> None:
    """Every process raises ``Preempted`` here, "stopped by SIG{where}", if any received a
    stop signal (collective): for a place where what is saved already suffices."""
    signum = agreed_signal(procs)
    if signum is not None:
        raise Preempted(signum, f"stopped by {signal_name(signum)} {where}")
