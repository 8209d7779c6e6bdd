"""Start N local processes as torchrun --standalone does for one node (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT), without torchrun's agent process.

The tests of what several processes compute launch dozens of 2-process runs; the agent is a
third Python process importing torch for each one (without it tests/test_distributed.py took
282 CPU-seconds instead of 329, measured with each test's process and children). The
tests of launching itself (the multi-GPU guide's torchrun command, accelerate launch with the
shipped FSDP config, signals sent to torchrun) keep the real launchers."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(
    args: list[str], nproc: int, env: dict[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``python *args`` in ``nproc`` processes of one group; the result's stdout and stderr
    are every process's, rank 0's first. When one process fails the others are stopped (they
    would wait in a collective), and the return code is the first failure's."""
    port = str(free_port())
    procs, logs = [], []
    for rank in range(nproc):
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0",
                    "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, *args], cwd=cwd, env=rank_env,
                                      stdout=out, stderr=err))  # fmt: skip
        logs.append((out, err))
    deadline, code = time.monotonic() + timeout, 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                code = failed[0] if failed else 124
                break
            time.sleep(0.05)
        else:
            code = next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def read(f) -> str:
        f.seek(0)
        return f.read().decode(errors="replace")

    stdout = "".join(read(out) for out, _ in logs)
    stderr = "".join(read(err) for _, err in logs)
    for out, err in logs:
        out.close()
        err.close()
    return subprocess.CompletedProcess([sys.executable, *args], code, stdout, stderr)
