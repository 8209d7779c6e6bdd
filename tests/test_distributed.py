"""Scale-out (issue 9): real launches of 2 CPU processes (gloo), started as torchrun starts
them, and by torchrun and accelerate launch where the launch is what is tested."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sqdf.infra.distributed import rank_seed
from sqdf.methods import METHODS, build_method_params
from sqdf.tasks import build_task
from sqdf.training.update import average_and_clip
from tests.distributed.launch import run_processes
from tests.distributed.shards import CFG, global_cells, shard

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


# what accelerate launch sets for a config with distributed_type FSDP and fsdp_version 2
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def launch(
    args: list[str], nproc: int = 2, env: dict[str, str] | None = None, torchrun: bool = False
) -> subprocess.CompletedProcess:
    """``python *args`` in ``nproc`` processes of one group: started as torchrun starts them
    (tests/distributed/launch.py), or by torchrun itself where the launch is what is tested."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "PYTHONFAULTHANDLER": "1",
        **(env or {}),
    }  # a crash prints where it was
    if torchrun:
        cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", *args]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    else:
        done = run_processes(args, nproc, env, ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def sqdf_train(
    out: Path, *flags: str, nproc: int = 2, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    argv = ["-m", "sqdf.cli", "train", "--out", str(out), "--no-progress", *flags]
    return launch(argv, nproc, env)


def test_rank_seeds_keep_rank_zero_and_differ():
    assert rank_seed(5, 0) == 5
    seeds = {rank_seed(5, r) for r in range(8)} | {rank_seed(5, 1, start=10)}
    assert len(seeds) == 9
    assert rank_seed(5, 3) == rank_seed(5, 3)


@pytest.mark.parametrize("fsdp", [False, True], ids=["all-reduce", "fsdp"])
def test_two_processes_of_batch_b_equal_one_process_of_batch_2b(tmp_path, fsdp):
    b = 8
    script = str(ROOT / "tests/distributed/one_update.py")
    launch([script, str(tmp_path / "p.safetensors"), str(b)], env=FSDP_ENV if fsdp else None)
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
    from sqdf.infra.distributed import Processes

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


RANK_ONE_NAN = """
import math, os
def score(images, c):
    v = images.flatten(1).mean(1)
    return v * math.nan if os.environ["RANK"] == "1" else v
"""


def test_a_process_that_skips_its_loss_keeps_the_collectives_in_step(tmp_path):
    # process 1 never stores a sample (its rewards are NaN), so it skips every loss while
    # process 0 computes its own: the logged statistics must still be averaged in step
    (tmp_path / "rank_one_nan.py").write_text(RANK_ONE_NAN)
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    flags = ["--task", "digits", "--reward", "rank_one_nan:score", "--num-steps", "4",
             "--batch-size", "4", "--steps", "3", "--log-every", "1", "--checkpoint-every", "0",
             "--max-skips", "5", "--device", "cpu"]  # fmt: skip
    sqdf_train(tmp_path / "run", *flags, env=env)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in rows] == [1, 2, 3]  # process 1 skips: all skip
    assert all(r["kl_mean"] == r["kl_mean"] for r in rows)  # process 0's, not NaN


def test_a_group_without_a_cpu_backend_runs_the_same_training(tmp_path):
    # NCCL has no backend for CPU tensors: a launch on GPUs sends those over gloo beside it
    flags = ["train", "--task", "gmm2d", "--num-steps", "8", "--batch-size", "16", "--steps",
             "4", "--checkpoint-every", "2", "--log-every", "1", "--device", "cpu",
             "--no-progress"]  # fmt: skip
    script = str(ROOT / "tests/distributed/cuda_only_group.py")
    launch([script, *flags, "--out", str(tmp_path / "cuda_only")])
    sqdf_train(tmp_path / "plain", *flags[1:])
    a, b = (final_weights(tmp_path / run) for run in ("plain", "cuda_only"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ck = tmp_path / "cuda_only" / "checkpoints" / "step_0000004"
    assert (ck / "buffer.rank1.safetensors").is_file()  # gathered over gloo, saved by one


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


def test_multi_gpu_guide_cpu_example_runs(tmp_path):
    from tests.doc_commands import doc_block

    (line,) = doc_block("docs/guides/multi-gpu.md", "torchrun --standalone").strip().splitlines()
    argv = line.split()
    assert argv[1:4] == ["--standalone", "--nproc_per_node", "2"] and argv[-2] == "--out"
    out = tmp_path / "g2"
    launch([*argv[4:-1], str(out), "--no-progress"], torchrun=True)  # adds torchrun's flags
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["step"] == 20


def final_weights(run: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / ("ema" if ema else "") / "policy.safetensors"))


def test_two_processes_with_disk_buffers_resume_exactly(tmp_path):
    # each process its own shard; full after 2 updates, stopped at 5 (checkpoint at 3): both
    # processes wrote over slots of that checkpoint before the resume
    flags = ["--task", "gmm2d", "--num-steps", "6", "--batch-size", "8", "--buffer-size", "16",
             "--buffer-store", "disk", "--device", "cpu", "--checkpoint-every", "3"]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    sqdf_train(whole, *flags, "--steps", "6")
    sqdf_train(parts, *flags, "--steps", "5")
    launch(["-m", "sqdf.cli", "train", "--resume", str(parts), "--steps", "6", "--no-progress"])
    a, c = (load_file(str(r / "final" / "policy.safetensors")) for r in (whole, parts))
    assert all(torch.equal(a[k], c[k]) for k in a)
    names = sorted(p.name for p in (parts / "buffer").iterdir())
    assert names == ["states.npy", "states.rank1.npy", "tags.npy", "tags.rank1.npy"]


def test_fsdp_train_resumes_exactly_matches_all_reduce_and_resumes_without_fsdp(tmp_path):
    from sqdf.config.train_config import TrainConfig
    from sqdf.training.trainer import train

    # with a moving average: swapped into sharded parameters at checkpoints and at the end
    flags = ["--task", "gmm2d", "--num-steps", "8", "--batch-size", "16", "--device", "cpu",
             "--checkpoint-every", "3", "--ema-decay", "0.9"]  # fmt: skip
    sqdf_train(tmp_path / "fsdp", *flags, "--steps", "6", env=FSDP_ENV)
    sqdf_train(tmp_path / "part", *flags, "--steps", "3", env=FSDP_ENV)
    launch(["-m", "sqdf.cli", "train", "--resume", str(tmp_path / "part"), "--steps", "6",
            "--no-progress"], env=FSDP_ENV)  # fmt: skip
    sqdf_train(tmp_path / "reduce", *flags, "--steps", "6")
    for ema in (False, True):
        fsdp = final_weights(tmp_path / "fsdp", ema)
        for k, v in final_weights(tmp_path / "part", ema).items():
            assert torch.equal(v, fsdp[k]), k  # the sharded checkpoint resumes bitwise
        for k, v in final_weights(tmp_path / "reduce", ema).items():
            torch.testing.assert_close(v, fsdp[k], rtol=1e-5, atol=1e-6)  # same, sharded
    raw = final_weights(tmp_path / "fsdp")
    assert any(
        not torch.equal(v, raw[k]) for k, v in final_weights(tmp_path / "fsdp", True).items()
    )
    # an FSDP checkpoint is a plain one: one process without FSDP continues it
    cfg = TrainConfig(task="gmm2d", num_steps=8, batch_size=16, device="cpu",
                      checkpoint_every=3, steps=8, ema_decay=0.9)  # fmt: skip
    (tmp_path / "fsdp" / "final" / "policy.safetensors").unlink()
    train(cfg, tmp_path / "fsdp", resume=True, progress=False)
    assert (tmp_path / "fsdp" / "final" / "policy.safetensors").is_file()


def test_fsdp_config_on_one_process_is_still_fsdp(tmp_path):
    flags = ["--task", "gmm2d", "--num-steps", "4", "--steps", "2", "--device", "cpu"]
    argv = ["-m", "sqdf.cli", "train", "--out", str(tmp_path / "one"), *flags]
    done = launch(argv, nproc=1, env=FSDP_ENV)
    assert "FSDP2 shards the policy over 1 processes" in done.stderr
    assert (tmp_path / "one" / "final" / "policy.safetensors").is_file()


def test_fsdp_shards_the_fully_fine_tuned_digits_unet(tmp_path):
    from sqdf.tasks.digits import shipped_model
    from sqdf.tasks.digits_model import load_unet

    run = tmp_path / "d"
    sqdf_train(run, "--task", "digits", "--task-param", "finetune=full", "--num-steps", "4",
               "--batch-size", "4", "--steps", "2", "--estimator", "tweedie", "--device", "cpu",
               "--checkpoint-every", "1", env=FSDP_ENV)  # fmt: skip
    base = load_unet(shipped_model() / "unet", "digits base model").state_dict()
    final = final_weights(run)
    assert set(final) == set(base)  # the whole UNet, gathered from its shards
    assert any(not torch.equal(final[k], base[k]) for k in base)


def test_fsdp_refuses_what_it_cannot_shard():
    from sqdf.config.train_config import TrainConfig
    from sqdf.errors import ConfigError
    from sqdf.training.start import check_fsdp

    lora = TrainConfig(task="digits", reward="ink", device="cpu", num_steps=4)
    with pytest.raises(ConfigError, match='set task_params.finetune = "full"'):
        check_fsdp(build_task(lora), lora)
    gmm = build_task(TrainConfig(task="gmm2d", device="cpu"))
    for values, message in [
        ({"method": "alignprop"}, "method alignprop cannot run under FSDP: each process draws"),
        ({"method": "refl"}, "method refl cannot run under FSDP"),
        ({"rollout": "truncated", "buffer": "on_policy"}, "rollout truncated cannot run under"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_fsdp(gmm, TrainConfig(task="gmm2d", device="cpu", **values))


def test_shipped_fsdp_config_fine_tunes_the_whole_sd_unet(tmp_path):
    """The README's FSDP command, on tiny random SD parts and 2 CPU processes."""
    from diffusers import UNet2DConditionModel

    from sqdf.tasks.sd_random import write_parts

    parts = write_parts(tmp_path / "parts")
    run = tmp_path / "sd"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(TORCHRUN.with_name("accelerate")), "launch", "--config_file",
           str(ROOT / "configs/accelerate/fsdp_full_finetune.yaml"), "--num_processes", "2",
           "-m", "sqdf.cli", "train", "--task", "sd", "--model", parts["model"],
           "--task-param", "finetune=full", "--reward", "aesthetic",
           "--reward-param", f"clip={parts['clip']}", "--reward-param", f"head={parts['head']}",
           "--estimator", "tweedie", "--num-steps", "4", "--batch-size", "2", "--steps", "2",
           "--grad-accum", "1", "--checkpoint-every", "1", "--out", str(run)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # one FSDP unit per transformer and ResNet block, and the root
    assert "FSDP2 shards the policy over 2 processes in 14 unit(s)" in done.stderr
    unet = UNet2DConditionModel.from_pretrained(str(run / "final" / "unet"))
    base = UNet2DConditionModel.from_pretrained(parts["model"], subfolder="unet")
    assert set(unet.state_dict()) == set(base.state_dict())
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in unet.state_dict().items())


BBO_ORACLE = """
import os
import shutil

def score(samples, cond, log):
    with open(log, "a") as fh:
        fh.write(f"{os.getpid()} {samples.shape[0]}\\n")
    return (-(samples - 0.5).pow(2).sum(1)).tolist()
"""


def test_bbo_on_two_processes_queries_the_oracle_once(tmp_path, monkeypatch, caplog):
    (tmp_path / "oracle_once.py").write_text(BBO_ORACLE)
    log, out = tmp_path / "calls.txt", tmp_path / "bbo"
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    launch(["-m", "sqdf.cli", "bbo", "--task", "gmm2d", "--methods", "sqdf,best_of_n",
            "--seeds", "1", "--rounds", "3", "--queries-per-round", "8",
            "--updates-per-round", "2", "--proxy-steps", "10", "--oracle", "oracle_once:score",
            "--oracle-param", f"log='{log}'", "--set", "num_steps=6", "--set", "batch_size=8",
            "--set", "device='cpu'", "--out", str(out), "--no-progress"], env=env)  # fmt: skip
    calls = [line.split() for line in log.read_text().splitlines()]
    assert len({pid for pid, _ in calls}) == 1  # one process asks the oracle
    assert sum(int(n) for _, n in calls) == 2 * 24  # each method's budget, spent once
    doc = json.loads((out / "results.json").read_text())
    assert [r["queries"] for r in doc["methods"]["sqdf"]["rounds"]] == [8, 16, 24]
    # the checkpoint after the last fine-tuning round holds both processes' buffers
    run = out / "runs" / "sqdf-seed0"
    last = sorted((run / "checkpoints").iterdir())[-1]
    assert (last / "buffer.rank1.safetensors").is_file()
    # cut the sqdf run back to round 1, then resume it on one process
    shutil.rmtree(last)
    (run / "queries" / "round_0002.safetensors").unlink()
    monkeypatch.syspath_prepend(str(tmp_path))
    from sqdf.bbo import resume_bbo

    with caplog.at_level("WARNING", logger="sqdf"):
        resume_bbo(out, progress=False)
    assert "resuming a 2-process run on 1 processes" in caplog.text
    assert "buffers of processes 1..1 are dropped" in caplog.text
    calls = log.read_text().splitlines()
    assert sum(int(line.split()[1]) for line in calls) == 2 * 24 + 8  # round 2 asked again
    doc = json.loads((out / "results.json").read_text())
    assert [r["queries"] for r in doc["methods"]["sqdf"]["rounds"]] == [8, 16, 24]


def test_two_processes_log_once_draw_pictures_together_and_average_the_weights(tmp_path):
    from tests.test_trackers import image_steps, tensorboard_scalars

    run = tmp_path / "run"
    sqdf_train(run, "--task", "gmm2d", "--num-steps", "8", "--batch-size", "16", "--device",
               "cpu", "--steps", "4", "--log-every", "1", "--log-with", "tensorboard",
               "--sample-every", "2", "--ema-decay", "0.9")  # fmt: skip
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # main only
    assert [s for s, _ in tensorboard_scalars(run)["reward_mean"]] == [1, 2, 3, 4]
    assert image_steps(run) == [2, 4]
    ema = load_file(str(run / "final" / "ema" / "policy.safetensors"))
    raw = load_file(str(run / "final" / "policy.safetensors"))
    assert ema.keys() == raw.keys() and any(not torch.equal(ema[k], raw[k]) for k in ema)


def test_a_shared_buffer_holds_every_processs_trajectories_and_resumes_exactly(tmp_path):
    # each process samples 6 fresh trajectories a round (fresh_trajectories), both store the
    # union of 12 in rank order; checkpointed at 2 and resumed, the run ends as the whole one
    flags = ["--task", "gmm2d", "--num-steps", "6", "--batch-size", "4", "--device", "cpu",
             "--fresh-trajectories", "6", "--buffer-scope", "shared", "--buffer-size", "36",
             "--checkpoint-every", "2", "--log-every", "1"]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    sqdf_train(whole, *flags, "--steps", "4")
    ck = whole / "checkpoints" / "step_0000002"
    assert not (ck / "buffer.rank1.safetensors").exists()  # one copy of the union
    b0 = load_file(str(ck / "buffer.safetensors"))
    assert b0["size_ptr"].tolist() == [24, 24]  # 2 rounds x 6 fresh x 2 processes
    # the union holds both processes' own draws: rank 1's half differs from rank 0's
    first = b0["states"][:12]
    assert not torch.equal(first[:6], first[6:])
    rows = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["samples_seen"] == 4 * 6 * 2
    resolved = json.loads((whole / "config.json").read_text())["resolved"]
    assert resolved["fresh_trajectories_per_process"] == 6
    sqdf_train(parts, *flags, "--steps", "2")
    launch(["-m", "sqdf.cli", "train", "--resume", str(parts), "--steps", "4", "--no-progress"])
    a, c = (final_weights(r) for r in (whole, parts))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_shared_buffer_is_checkpointed_once_and_resumed_in_every_process(tmp_path):
    # checkpointed on one process, resumed on two: the new process loads the union too (the
    # checkpoint at 4 checks that both buffers agree, and keeps the main process's alone)
    flags = ["--task", "gmm2d", "--num-steps", "6", "--batch-size", "4", "--device", "cpu",
             "--fresh-trajectories", "6", "--buffer-scope", "shared", "--buffer-size", "36",
             "--checkpoint-every", "2", "--log-every", "1"]  # fmt: skip
    run = tmp_path / "r"
    sqdf_train(run, *flags, "--steps", "2", nproc=1)
    done = launch(["-m", "sqdf.cli", "train", "--resume", str(run), "--steps", "4",
                   "--no-progress"])  # fmt: skip
    assert "every process loads the shared buffer" in done.stderr
    ck = run / "checkpoints" / "step_0000004"
    assert sorted(p.name for p in ck.glob("buffer*")) == ["buffer.safetensors"]
    saved = load_file(str(ck / "buffer.safetensors"))
    assert saved["size_ptr"].tolist() == [36, 0]  # 12 + 2 rounds x 6 fresh x 2 processes
    early = load_file(str(run / "checkpoints" / "step_0000002" / "buffer.safetensors"))
    assert torch.equal(saved["rewards"][:12], early["rewards"][:12])  # kept, not emptied


def test_a_disk_shared_buffer_refuses_more_processes_than_wrote_it():
    from types import SimpleNamespace

    from sqdf.errors import SqdfError
    from sqdf.infra.checkpoint import Checkpoint
    from sqdf.training.start import restore_process_states

    # a disk buffer's state names rows of the writing process's files: a new process has none
    ck = Checkpoint(step=2, policy={}, optimizer={}, buffers=[{"rows": torch.zeros(1)}],
                    rngs=[torch.Generator().get_state()], state={})  # fmt: skip
    procs = SimpleNamespace(rank=0, world=2, is_main=True)
    with pytest.raises(SqdfError, match="on 2 processes: the run wrote files for 1; resume on "
                                        "at most 1, or with buffer_store memory"):  # fmt: skip
        restore_process_states(procs, ck, None, torch.Generator(), None, 0, shared=True)


@pytest.mark.parametrize("scope", ["shared", "process"])
def test_a_shared_buffers_rewards_are_tallied_once(scope):
    from types import SimpleNamespace

    from sqdf.training.state import Fresh, Gradients
    from sqdf.training.update import count_update

    union = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    tally = 0
    for rank in range(2):  # each process's contribution to the all-reduced sum
        procs = SimpleNamespace(rank=rank, world=2, is_main=rank == 0, sum=lambda t: t)
        s = SimpleNamespace(cfg=SimpleNamespace(buffer_scope=scope), procs=procs,
                            task=SimpleNamespace(reward_model=None),
                            counters={"nonfinite_rewards": 0, "samples_seen": 0,
                                      "reward_evals": 0})  # fmt: skip
        rows = union if scope == "shared" else union[2 * rank : 2 * rank + 2]
        tally = tally + count_update(s, Fresh(rewards=rows), Gradients())
    assert float(tally[6]) == 4 and float(tally[4]) == float(union.sum())
    assert float(tally[5]) == float((union**2).sum())


@pytest.mark.parametrize(("scope", "copies"), [("shared", 1), ("process", 2)])
def test_the_first_checkpoints_size_counts_one_shared_buffer(scope, copies):
    from types import SimpleNamespace

    from sqdf.training.start import first_checkpoint_bytes

    store = SimpleNamespace(on_disk=False, dtype=torch.float32)
    s = SimpleNamespace(
        task=SimpleNamespace(policy=torch.nn.Linear(1, 1, bias=False), sample_shape=(2,)),
        params=[], ema=None, buffer=SimpleNamespace(store=store),
        cfg=SimpleNamespace(rollout="full", num_steps=4, buffer_size=10, buffer_scope=scope),
        procs=SimpleNamespace(world=2),
    )  # fmt: skip
    assert first_checkpoint_bytes(s) == 4 + copies * 10 * 5 * 2 * 4


def test_a_process_buffer_keeps_only_its_own(tmp_path):
    flags = ["--task", "gmm2d", "--num-steps", "6", "--batch-size", "4", "--device", "cpu",
             "--fresh-trajectories", "6", "--buffer-size", "36", "--checkpoint-every", "1",
             "--steps", "1"]  # fmt: skip
    sqdf_train(tmp_path / "r", *flags)
    ck = tmp_path / "r" / "checkpoints" / "step_0000001"
    b0, b1 = (load_file(str(ck / n)) for n in ("buffer.safetensors", "buffer.rank1.safetensors"))
    assert b0["size_ptr"].tolist() == [6, 6] and not torch.equal(b0["states"], b1["states"])


def test_a_shared_buffer_that_cannot_hold_one_round_is_refused():
    from sqdf.config.train_config import TrainConfig
    from sqdf.errors import ConfigError
    from sqdf.training.start import check_shared_buffer

    cfg = TrainConfig(fresh_trajectories=600, buffer_scope="shared")
    check_shared_buffer(cfg, 1)
    with pytest.raises(ConfigError, match="600 fresh trajectories x 2 processes = 1200 a round"):
        check_shared_buffer(cfg, 2)
