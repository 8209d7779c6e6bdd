"""Scale-out (issue 9): real launches of 2 CPU processes with torchrun (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sqdf.distributed import rank_seed
from sqdf.methods import METHODS, build_method_params
from sqdf.tasks import build_task
from sqdf.trainer import average_and_clip
from tests.distributed.shards import CFG, global_cells, shard

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def launch(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def sqdf_train(out: Path, *flags: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return launch(["-m", "sqdf.cli", "train", "--out", str(out), "--no-progress", *flags], nproc)


def test_rank_seeds_keep_rank_zero_and_differ():
    assert rank_seed(5, 0) == 5
    seeds = {rank_seed(5, r) for r in range(8)} | {rank_seed(5, 1, start=10)}
    assert len(seeds) == 9
    assert rank_seed(5, 3) == rank_seed(5, 3)


def test_two_processes_of_batch_b_equal_one_process_of_batch_2b(tmp_path):
    b = 8
    launch([str(ROOT / "tests/distributed/one_update.py"), str(tmp_path / "p.safetensors"), str(b)])
    two = load_file(str(tmp_path / "p.safetensors"))

    # one process, the same 2b cells and the same noise per half: the batch-2b loss is the
    # mean of the halves' means, so its gradient is the mean of theirs
    torch.manual_seed(CFG.seed)
    task = build_task(CFG)
    params = [p for p in task.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=CFG.lr, weight_decay=CFG.weight_decay)
    cells = global_cells(task, 2 * b)
    total = 0.0
    for r in range(2):
        loss, _ = METHODS["sqdf"].loss(
            task, shard(cells, r, b), CFG, build_method_params("sqdf", {}),
            torch.Generator().manual_seed(100 + r),
        )  # fmt: skip
        total = total + loss / 2
    total.backward()
    from sqdf.distributed import Processes

    norm = average_and_clip(Processes("cpu"), params, CFG.max_grad_norm)
    assert norm > CFG.max_grad_norm  # the clip is exercised
    before = {k: v.clone() for k, v in task.policy.state_dict().items()}
    optimizer.step()
    one = task.policy.state_dict()
    assert any(not torch.equal(before[k], one[k]) for k in one)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)


def test_train_on_two_processes_resumes_exactly_and_on_one(tmp_path):
    flags = ["--task", "gmm2d", "--num-steps", "8", "--batch-size", "16", "--device", "cpu"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    sqdf_train(whole, *flags, "--steps", "6", "--checkpoint-every", "3", "--log-every", "1")
    rows = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # written once, by one process
    assert rows[-1]["samples_seen"] == 6 * 2 * 16  # counted over both processes
    assert json.loads((whole / "config.json").read_text())["resolved"]["processes"] == 2
    ck = whole / "checkpoints" / "step_0000006"
    assert (ck / "buffer.safetensors").is_file() and (ck / "buffer.rank1.safetensors").is_file()
    b0, b1 = (
        load_file(str(ck / n))["states"] for n in ("buffer.safetensors", "buffer.rank1.safetensors")
    )
    assert not torch.equal(b0, b1)  # each process sampled its own trajectories

    sqdf_train(parts, *flags, "--steps", "3", "--checkpoint-every", "3", "--log-every", "1")
    launch(["-m", "sqdf.cli", "train", "--resume", str(parts), "--steps", "6", "--no-progress"])
    a = load_file(str(whole / "final" / "policy.safetensors"))
    c = load_file(str(parts / "final" / "policy.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert (whole / "metrics.jsonl").read_text().count("\n") == 6
    assert [json.loads(x)["step"] for x in (parts / "metrics.jsonl").read_text().splitlines()] == [
        1, 2, 3, 4, 5, 6
    ]  # fmt: skip

    # the same run continued by one process: it keeps process 0's buffer and says so
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "sqdf.cli", "train", "--resume", str(parts), "--steps", "8",
         "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "resuming a 2-process run on 1 processes" in done.stderr
    assert "buffers of processes 1..1 are dropped" in done.stderr
    assert json.loads((parts / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 8


def test_compare_on_two_processes_writes_one_result(tmp_path):
    out = tmp_path / "cmp"
    done = launch(
        ["-m", "sqdf.cli", "compare", "--task", "gmm2d", "--methods", "sqdf", "--seeds", "1",
         "--steps", "4", "--num-samples", "64", "--set", "num_steps=8", "--set", "device=cpu",
         "--out", str(out), "--no-progress"]
    )  # fmt: skip
    doc = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in doc["runs"]] == ["sqdf"]
    assert doc["runs"][0]["updates"] == 4
    assert done.stdout.count("wrote ") == 1  # the other process printed nothing


@pytest.mark.parametrize("flag", [["--device", "cuda:1"]])
def test_explicit_device_with_several_processes_is_a_clear_error(tmp_path, flag):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "sqdf.cli", "train",
           "--task", "gmm2d", "--steps", "1", "--out", str(tmp_path / "r"), *flag]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "cannot be used with several processes" in done.stderr


def test_readme_cpu_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    line = next(
        ln
        for ln in readme.splitlines()
        if ln.startswith("torchrun --standalone --nproc_per_node 2")
    )
    argv = line.split()
    assert argv[1:4] == ["--standalone", "--nproc_per_node", "2"] and argv[-2] == "--out"
    out = tmp_path / "g2"
    launch([*argv[4:-1], str(out), "--no-progress"])  # launch() adds the torchrun flags
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["step"] == 20
