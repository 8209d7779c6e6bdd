"""Faults a cluster user meets (issue 38): stop signals at random updates and inside a
checkpoint write, a full disk (a small tmpfs where the test may mount one; ENOSPC raised at the
real write call where not), a read-only run folder, a checkpoint folder removed under a running
job, and a stop signal in sqdf bbo and sqdf compare. Each asserts the one line, the exit status,
that no partial file is taken for a whole one, and a resume bitwise equal to the uninterrupted
run. docs/reliability.md quotes the figures."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import sqdf.infra.checkpoint as checkpoint_module
import sqdf.training.start as start_module
import sqdf.training.trainer as trainer_module
from sqdf.cli import main
from sqdf.infra.checkpoint import list_checkpoints, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = 12
ARGS = ["--task", "gmm2d", "--num-steps", "6", "--batch-size", "8", "--buffer-size", "32",
        "--checkpoint-every", "4", "--log-every", "1", "--device", "cpu", "--no-progress",
        "--task-param", "hidden=16"]  # fmt: skip


def _cmd(run: Path, resume: bool, steps: int = STEPS) -> list[str]:
    if resume:
        return ["train", "--resume", str(run), "--steps", str(steps), "--no-progress"]
    return ["train", "--out", str(run), "--steps", str(steps), *ARGS]


def _env(delay: float = 0.0) -> dict[str, str]:
    # one thread: bitwise equality between processes
    return {**os.environ, "OMP_NUM_THREADS": "1", "SQDF_FAULT_CHECKPOINT_DELAY": str(delay),
            "PYTHONPATH": str(ROOT)}  # fmt: skip


def _start(run: Path, resume: bool, delay: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sqdf.cli", *_cmd(run, resume)],
        env=_env(delay), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _rows(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait(proc: subprocess.Popen, ready) -> None:
    deadline = time.time() + 120  # a bound on a hung process, not a timing assertion
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the fault"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "policy.safetensors"))


def _assert_equal(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _no_partial(run: Path) -> None:
    """No temporary file or folder is left, and every checkpoint listed verifies."""
    assert not [p for p in run.rglob(".tmp-*")], list(run.rglob(".tmp-*"))
    for ck in list_checkpoints(run / "checkpoints"):
        assert verify_checkpoint(ck) is None, ck


def _stopped(err: str, code: int, sig: signal.Signals, run: Path) -> int:
    """The one line a stop prints; returns the update it stopped at."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    m = re.fullmatch(
        rf"sqdf train: stopped by {sig.name} at update (\d+); checkpoint written; "
        rf"continue with: sqdf train --resume {re.escape(str(run))}",
        lines[0],
    )
    assert m, lines[0]
    assert code == 128 + sig
    n = int(m.group(1))
    assert (run / "checkpoints" / f"step_{n:07d}").is_dir()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, n + 1))
    _no_partial(run)
    return n


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    cmd = [sys.executable, "-m", "sqdf.cli", *_cmd(run, False)]
    subprocess.run(cmd, env=_env(), check=True, capture_output=True)
    return run


def test_stop_signals_checkpoint_say_so_and_resume_bitwise(tmp_path, straight):
    run, rng, stops = tmp_path / "run", random.Random(38), []
    # SIGTERM at a random update
    proc = _start(run, False)
    target = rng.randint(1, 3)
    _wait(proc, lambda: _rows(run) >= target)
    proc.send_signal(signal.SIGTERM)
    stops.append(_stopped(proc.communicate(timeout=120)[1], proc.returncode, signal.SIGTERM, run))
    # SIGINT inside a checkpoint write (slowed down): that checkpoint is the one it keeps
    proc = _start(run, True, delay=0.3)
    _wait(proc, lambda: any((run / "checkpoints").glob(".tmp-step_*")))
    writing = int(next((run / "checkpoints").glob(".tmp-step_*")).name[-7:])
    proc.send_signal(signal.SIGINT)
    stops.append(_stopped(proc.communicate(timeout=120)[1], proc.returncode, signal.SIGINT, run))
    assert stops[-1] == writing
    # SIGUSR1 at a random update, then a second signal inside the stop's checkpoint: at once
    proc = _start(run, True, delay=0.5)
    target = _rows(run) + rng.randint(1, 2)
    _wait(proc, lambda: _rows(run) >= target)
    proc.send_signal(signal.SIGUSR1)
    _wait(proc, lambda: any((run / "checkpoints").glob(".tmp-step_*")))
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == -signal.SIGTERM, err
    assert err.strip().splitlines() == ["sqdf: second SIGTERM: stopping at once"]
    # the half-written folder is not taken for a checkpoint
    assert all(verify_checkpoint(ck) is None for ck in list_checkpoints(run / "checkpoints"))
    assert max(int(p.name[-7:]) for p in list_checkpoints(run / "checkpoints")) == writing
    done = subprocess.run(
        [sys.executable, "-m", "sqdf.cli", *_cmd(run, True)], env=_env(), capture_output=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_equal(straight, run)
    print(f"stopped at updates {stops}, then at once inside the checkpoint at {writing}")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            child = int(stat.parent.name)
            found += [child, *_children(child)]
    return found


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _children(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


def _torchrun(*args: str) -> list[str]:
    return [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "sqdf.cli", *args]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the launched processes in /proc")
def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_update(tmp_path):
    whole, run = tmp_path / "whole", tmp_path / "run"
    subprocess.run(_torchrun(*_cmd(whole, False, 8)), env=_env(), check=True, capture_output=True)
    proc = subprocess.Popen(
        _torchrun(*_cmd(run, False, 8)), env=_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait(proc, lambda: _rows(run) >= 2 and _rank_pid(proc.pid, 1) is not None)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)  # rank 1 alone: rank 0 must agree
    err = proc.communicate(timeout=300)[1]
    stops = re.findall(r"stopped by SIGTERM at update (\d+); checkpoint written", err)
    assert len(stops) == 1, err[-3000:]  # said once, by the main process
    n = int(stops[0])
    ck = run / "checkpoints" / f"step_{n:07d}"
    assert (ck / "buffer.safetensors").is_file() and (ck / "buffer.rank1.safetensors").is_file()
    assert json.loads((ck / "state.json").read_text())["processes"] == 2
    _no_partial(run)
    subprocess.run(_torchrun(*_cmd(run, True, 8)), env=_env(), check=True, capture_output=True)
    _assert_equal(whole, run)


# ---- a full disk, a read-only folder, a folder removed: in process, through the CLI ----


def _in_process(capsys, argv: list[str]) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _disk_full_at(monkeypatch, where) -> None:
    """safetensors' save_file writes part of a file matching ``where`` and fails as it does
    on a full disk (its own error type and message)."""
    real = checkpoint_module.save_file

    def save_file(tensors, path):
        if where(Path(path)):
            Path(path).write_bytes(b"\0" * 100)
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        return real(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)


def test_a_full_disk_at_a_checkpoint_keeps_the_earlier_one(
    tmp_path, capsys, monkeypatch, one_thread
):
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert main(_cmd(straight, False)) == 0
    _disk_full_at(monkeypatch, lambda p: p.parent.name == ".tmp-step_0000008")
    code, lines = _in_process(capsys, _cmd(run, False))
    assert code == 2 and len(lines) == 1, lines
    assert re.fullmatch(
        rf"sqdf train: error: could not write checkpoint step_0000008 to {run}/checkpoints: No "
        r"space left on device \(it needs about [\d.]+ KB, [\d.]+ [KMG]?B free there\); the "
        r"checkpoints before it are kept \(newest: step_0000004\): free space or make the "
        rf"folder writable, then continue with: sqdf train --resume {run}",
        lines[0],
    ), lines[0]
    _no_partial(run)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_0000004"]
    monkeypatch.undo()
    assert main(_cmd(run, True)) == 0
    _assert_equal(straight, run)


def test_final_weights_that_cannot_be_written_stay_in_a_checkpoint(
    tmp_path, capsys, monkeypatch, one_thread
):
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert main(_cmd(straight, False, 10)) == 0  # 10: the last update is off the grid of 4
    _disk_full_at(monkeypatch, lambda p: p.parent.name == ".tmp-final")  # final/ is staged
    code, lines = _in_process(capsys, _cmd(run, False, 10))
    assert code == 2 and len(lines) == 1, lines
    assert not (run / "final").exists()  # no half final/ for compare --resume to take as done
    assert lines[0].startswith(
        f"sqdf train: error: could not write the final weights to {run}/final"
    )
    assert lines[0].endswith(
        f"the trained weights are in checkpoints/step_0000010: free space, then write final/ "
        f"with: sqdf train --resume {run}"
    )
    _no_partial(run)
    assert not (run / "final" / "policy.safetensors").exists()
    monkeypatch.undo()
    code, lines = _in_process(capsys, _cmd(run, True, 10))  # no update left: final/ only
    assert code == 0
    _assert_equal(straight, run)


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)  # fmt: skip
    return done.returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    """A mount function for tmpfs file systems under tmp_path (skips where the test may not
    mount one), each unmounted after the test."""
    mounted = []

    def mount(name: str, size: int) -> Path:
        path = tmp_path / name
        if not _mount_tmpfs(path, size):
            pytest.skip("cannot mount a tmpfs here (not root); the injected faults cover it")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_small_filesystem_is_refused_before_training(tmp_path, capsys, small_fs, one_thread):
    disk = small_fs("tiny", 8 * 1024)
    code, lines = _in_process(capsys, _cmd(disk / "run", False))
    assert code == 2 and len(lines) == 1, lines
    assert re.fullmatch(
        rf"sqdf train: error: not enough space for {disk}/run: its first checkpoint needs about "
        r"[\d.]+ KB, [\d.]+ KB free there; free space or give another --out",
        lines[0],
    ), lines[0]
    assert not (disk / "run" / "metrics.jsonl").exists()  # not one update was trained


def test_a_filesystem_that_fills_up_stops_with_one_line_and_resumes(
    tmp_path, capsys, small_fs, one_thread
):
    straight = tmp_path / "straight"
    assert main(_cmd(straight, False)) == 0
    ck = sum(f.stat().st_size for f in (straight / "checkpoints" / "step_0000012").iterdir())
    # room for the first checkpoint (and config, metrics), not for a second beside it
    disk = small_fs("small", (int(ck * 1.5) // 4096 + 3) * 4096)
    run = disk / "run"
    code, lines = _in_process(capsys, _cmd(run, False))
    assert code == 2 and len(lines) == 1, lines
    assert re.fullmatch(
        rf"sqdf train: error: could not write (checkpoint step_0000008 to {run}/checkpoints|"
        rf"metrics.jsonl to {run}): No space left on device.*; the checkpoints before it are "
        rf"kept \(newest: step_0000004\): free space or make the folder writable, then "
        rf"continue with: sqdf train --resume {run}",
        lines[0],
    ), lines[0]
    _no_partial(run)
    moved = tmp_path / "moved"  # "free space": the run on a disk with room
    shutil.copytree(run, moved)
    assert main(_cmd(moved, True)) == 0
    _assert_equal(straight, moved)


def test_a_read_only_run_folder_is_one_line_and_left_as_it_was(
    tmp_path, capsys, small_fs, one_thread
):
    straight = tmp_path / "straight"
    assert main(_cmd(straight, False)) == 0
    disk = small_fs("ro", 4 * 2**20)
    run = disk / "run"
    assert main(_cmd(run, False, 8)) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    code, lines = _in_process(capsys, _cmd(run, True))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(
        f"sqdf train: error: could not write config.json to {run}: Read-only file system"
    ), lines[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    assert main(_cmd(run, True)) == 0
    _assert_equal(straight, run)


def test_a_checkpoint_folder_removed_during_a_write(tmp_path, capsys, monkeypatch, one_thread):
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert main(_cmd(straight, False)) == 0
    calls = []

    def remove_it():  # between two files of the checkpoint at update 8
        calls.append(1)
        if len(calls) == 7:  # the 6 files of step 4, then the first of step 8
            shutil.rmtree(run / "checkpoints")

    monkeypatch.setattr(checkpoint_module, "_slow_for_fault_tests", remove_it)
    code, lines = _in_process(capsys, _cmd(run, False))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(
        f"sqdf train: error: could not write checkpoint step_0000008 to {run}/checkpoints: "
        "No such file or directory"
    ), lines[0]
    assert lines[0].endswith("; no checkpoint was written yet")
    assert not (run / "checkpoints").exists()  # nothing half-written was put back
    monkeypatch.undo()
    assert main(_cmd(run, True)) == 0  # from the start: no checkpoint is left
    _assert_equal(straight, run)


# ---- sqdf bbo and sqdf compare: a signal stops them, resume ends where a whole run does ----


def _signal_at_update(monkeypatch, n: int, sig: signal.Signals) -> None:
    """The process sends itself ``sig`` during its ``n``-th update (counted over the run)."""
    real, count = trainer_module.apply_update, []

    def apply_update(*args, **kw):
        count.append(1)
        if len(count) == n:
            os.kill(os.getpid(), sig)
        return real(*args, **kw)

    monkeypatch.setattr(trainer_module, "apply_update", apply_update)


BBO = ["--task", "gmm2d", "--set", "reward=quadratic", "--set", "num_steps=5", "--set",
       "batch_size=8", "--set", "device=cpu", "--set", "task_params={hidden = 8}", "--methods",
       "sqdf", "--rounds", "3", "--queries-per-round", "8", "--updates-per-round", "2",
       "--proxy-steps", "20", "--seeds", "1", "--no-progress"]  # fmt: skip


def test_bbo_stops_on_a_signal_and_resumes_to_the_whole_run(
    tmp_path, capsys, monkeypatch, one_thread
):
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert main(["bbo", "--out", str(whole), *BBO]) == 0
    _signal_at_update(monkeypatch, 3, signal.SIGTERM)  # round 1's fine-tuning, its first update
    code, lines = _in_process(capsys, ["bbo", "--out", str(out), *BBO])
    assert code == 128 + signal.SIGTERM
    assert lines == [
        "sqdf bbo: stopped by SIGTERM at update 1 of round 1's fine-tuning (sqdf seed 0; "
        f"redone from its start on resume, its queries saved); continue with: sqdf bbo "
        f"--resume {out}"
    ], lines
    monkeypatch.undo()
    assert main(["bbo", "--resume", str(out), "--no-progress"]) == 0
    a, b = (json.loads((r / "results.json").read_text()) for r in (whole, out))
    key = [[row["oracle_mean"] for row in run] for run in a["runs"]["sqdf"]]
    assert key == [[row["oracle_mean"] for row in run] for run in b["runs"]["sqdf"]]
    ck = "runs/sqdf-seed0/checkpoints/step_0000002/policy.safetensors"
    wa, wb = load_file(str(whole / ck)), load_file(str(out / ck))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


COMPARE = ["--task", "gmm2d", "--methods", "sqdf,draft", "--seeds", "1", "--steps", "4",
           "--set", "num_steps=5", "--set", "batch_size=8", "--set", "checkpoint_every=2",
           "--set", "task_params={hidden = 8}", "--set", "device=cpu", "--num-samples", "64",
           "--no-progress"]  # fmt: skip


def test_compare_stops_on_a_signal_and_resumes_its_variants(
    tmp_path, capsys, monkeypatch, one_thread
):
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert main(["compare", "--out", str(whole), *COMPARE]) == 0
    _signal_at_update(monkeypatch, 6, signal.SIGTERM)  # draft's second update
    code, lines = _in_process(capsys, ["compare", "--out", str(out), *COMPARE])
    assert code == 128 + signal.SIGTERM
    assert lines == [
        "sqdf compare: stopped by SIGTERM at update 2 of draft-seed0; checkpoint written; "
        f"continue with: sqdf compare --resume {out}"
    ], lines
    finished = (out / "runs" / "sqdf-seed0" / "final" / "policy.safetensors").stat().st_mtime_ns
    monkeypatch.undo()
    assert main(["compare", "--resume", str(out), "--no-progress"]) == 0
    # the finished variant was kept, not trained again
    assert (
        out / "runs" / "sqdf-seed0" / "final" / "policy.safetensors"
    ).stat().st_mtime_ns == finished
    for name in ("sqdf-seed0", "draft-seed0"):
        _assert_equal(whole / "runs" / name, out / "runs" / name)
    a, b = (json.loads((r / "results.json").read_text())["runs"] for r in (whole, out))
    assert [r["reward_mean"] for r in a] == [r["reward_mean"] for r in b]


def test_a_full_disk_under_eval_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    import sqdf.evaluation.evaluate as evaluate_module

    run = tmp_path / "run"
    argv = ["train", "--task", "gmm2d", "--num-steps", "3", "--steps", "1", "--batch-size", "2",
            "--buffer-size", "4", "--device", "cpu", "--no-progress",
            "--out", str(run)]  # fmt: skip
    assert main(argv) == 0

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(evaluate_module, "atomic_write_text", full)
    capsys.readouterr()
    assert main(["eval", str(run), "--num-samples", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "eval.json" in err and "No space left on device" in err, err


def test_under_a_launcher_the_same_signal_twice_is_one_stop(monkeypatch):
    # SLURM signals every process of the step and torchrun forwards its own copy: a worker
    # gets SIGTERM twice, milliseconds apart, and must still stop after a checkpoint
    from sqdf.infra.preemption import received, stop_on_signals

    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(RuntimeError, match="leave the block"), stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # without the rule, this would end pytest
        assert received() == signal.SIGTERM
        raise RuntimeError("leave the block by an error: the recorded signal is not resent")


def test_a_signal_after_the_last_look_is_delivered_when_the_block_ends():
    from sqdf.infra.preemption import stop_on_signals

    # Python's own SIGINT handler, whatever an earlier test in this worker left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), stop_on_signals():
            os.kill(os.getpid(), signal.SIGINT)  # recorded, and nothing reads it in the block
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_signal_during_set_up_stops_before_any_update(tmp_path, capsys, monkeypatch):
    real = trainer_module.check_free_space

    def check_then_signal(s):
        real(s)
        os.kill(os.getpid(), signal.SIGTERM)  # as if it came while the model loaded

    monkeypatch.setattr(trainer_module, "check_free_space", check_then_signal)
    run = tmp_path / "run"
    code, lines = _in_process(capsys, _cmd(run, False))
    assert code == 128 + signal.SIGTERM and len(lines) == 1, lines
    assert lines[0].endswith(
        f"stopped by SIGTERM before the first update, nothing new trained; continue with: "
        f"sqdf train --resume {run}"
    ), lines[0]
    assert _rows(run) == 0 and not list_checkpoints(run / "checkpoints")


def test_too_little_space_is_refused_before_training_without_a_mount(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(start_module, "free_bytes", lambda path: 1000)
    run = tmp_path / "run"
    code, lines = _in_process(capsys, _cmd(run, False))
    assert code == 2 and len(lines) == 1, lines
    assert f"not enough space for {run}: its first checkpoint needs about" in lines[0]
    assert _rows(run) == 0


def test_a_resume_that_only_writes_final_needs_room_for_final_alone(
    tmp_path, capsys, monkeypatch, one_thread
):
    run = tmp_path / "run"
    assert main(_cmd(run, False, 8)) == 0  # its checkpoint at 8 holds every update
    final = run / "final" / "policy.safetensors"
    room = 2 * final.stat().st_size  # the weights fit; a whole checkpoint (AdamW, buffer) not
    shutil.rmtree(run / "final")  # as a run whose final/ could not be written leaves it
    monkeypatch.setattr(start_module, "free_bytes", lambda path: room)
    code, lines = _in_process(capsys, _cmd(run, True, 8))
    assert code == 0, lines
    assert final.is_file()
