"""Reliability: SIGKILL at random moments and resume, corrupt checkpoints, non-finite values,
safe loading. docs/reliability.md quotes the figures these tests fix."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sqdf import SqdfError, TrainConfig, train
from sqdf.infra.checkpoint import list_checkpoints, load_latest_checkpoint
from sqdf.tasks.digits_model import to_pixels
from tests.learning import assert_reward_rose

ROOT = Path(__file__).resolve().parents[1]
KILLS = 6  # SIGKILLs per kill test (docs/reliability.md quotes this)
ARGS = ["--steps", "40", "--num-steps", "8", "--batch-size", "16", "--buffer-size", "64",
        "--checkpoint-every", "2", "--log-every", "2", "--buffer", "prioritized",
        "--replay-ratio", "2", "--device", "cpu", "--no-progress"]  # fmt: skip


def _train_cmd(out: Path, resume: bool) -> list[str]:
    where = ["--resume", str(out)] if resume else ["--out", str(out)]
    return [sys.executable, "-m", "sqdf.cli", "train", *where, *ARGS]


def _env(delay: float) -> dict:
    # one thread: bitwise equality between processes, and no competition with the killer
    return {**os.environ, "OMP_NUM_THREADS": "1", "SQDF_FAULT_CHECKPOINT_DELAY": str(delay)}


def _rows(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_at_random_moments_then_resume_gives_identical_weights(tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight, False), env=_env(0), check=True, capture_output=True)
    run = tmp_path / "killed"
    rng = random.Random(0)
    kills, during_save, resume = 0, 0, False
    while True:
        proc = subprocess.Popen(
            _train_cmd(run, resume),
            env=_env(0.02),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if kills < KILLS:
            # wait for this process to make progress, then kill it at a random moment
            # (training, logging or inside a slowed-down checkpoint save)
            before, deadline = _rows(run), time.time() + 120
            while proc.poll() is None and _rows(run) <= before and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                tmp_dirs = list((run / "checkpoints").glob(".tmp-*")) if run.exists() else []
                during_save += bool(tmp_dirs)
                resume = (run / "config.json").exists()
                continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        break
    a = load_file(str(straight / "final" / "policy.safetensors"))
    b = load_file(str(run / "final" / "policy.safetensors"))
    assert kills == KILLS
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ after kill/resume"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 41, 2))
    print(f"kills survived: {kills} (of which during a checkpoint save: {during_save})")


def _tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(num_steps=6, steps=6, batch_size=8, buffer_size=16,
                                 checkpoint_every=2, log_every=1, device="cpu",
                                 estimator="tweedie"), **kw})  # fmt: skip


def test_corrupt_checkpoint_is_skipped_with_a_message(tmp_path, caplog):
    run = train(_tiny(), tmp_path / "run", progress=False)
    ckpts = list_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == ["step_0000004", "step_0000006"]
    with (ckpts[-1] / "policy.safetensors").open("r+b") as fh:  # flip bytes in the newest
        fh.seek(100)
        fh.write(b"\x00\x01\x02\x03")
    with caplog.at_level("WARNING", logger="sqdf"):
        ck = load_latest_checkpoint(run / "checkpoints")
    assert ck is not None and ck.step == 4
    assert "skipping corrupt checkpoint" in caplog.text and "checksum" in caplog.text
    (ckpts[0] / "state.json").unlink()  # and a torn one: nothing valid is left
    assert load_latest_checkpoint(run / "checkpoints") is None


def test_resume_from_the_previous_checkpoint_when_the_newest_is_corrupt(tmp_path):
    straight = train(_tiny(), tmp_path / "straight", progress=False)
    run = train(_tiny(), tmp_path / "run", progress=False)
    newest = list_checkpoints(run / "checkpoints")[-1]
    (newest / "buffer.safetensors").write_bytes(b"garbage")
    train(_tiny(), run, resume=True, progress=False)  # from step 4
    a, b = (load_file(str(r / "final" / "policy.safetensors")) for r in (straight, run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _reward_module(tmp_path, monkeypatch, body: str) -> str:
    (tmp_path / "bad_rewards.py").write_text("import torch\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("bad_rewards", None)
    return "bad_rewards"


def test_nan_rewards_never_reach_the_weights(tmp_path, monkeypatch):
    mod = _reward_module(
        tmp_path, monkeypatch, "def r(x, c):\n    return x.flatten(1).mean(1) * float('nan')\n"
    )
    cfg = _tiny(
        reward=f"{mod}:r",
        task="digits",
        estimator="consistency",
        max_skips=3,
        task_params={"classes": [1]},
        num_steps=3,
        batch_size=2,
        buffer_size=4,
    )
    with pytest.raises(
        SqdfError, match=r"3 consecutive updates skipped.*reward was not finite for 2 of 2"
    ):
        train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_updates"] == 2 and rows[-1]["nonfinite_rewards"] == 4
    assert not (tmp_path / "run" / "final").exists()
    # the checkpoint written at step 2 holds the initial (zero) LoRA B weights: untouched
    ck = load_latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert all(float(v.abs().max()) == 0 for k, v in ck.policy.items() if "lora_B" in k)
    # the streak of skips is part of the checkpoint: resumed, the run stops at update 3 as
    # the uninterrupted one did, not 3 skips later
    with pytest.raises(SqdfError, match=r"3 consecutive updates skipped"):
        train(cfg, tmp_path / "run", resume=True, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2


def test_resume_to_fewer_steps_than_trained_is_refused(tmp_path):
    run = train(_tiny(), tmp_path / "run", progress=False)
    before = (run / "config.json").read_text()
    with pytest.raises(SqdfError, match=r"checkpoint is at update 6; give steps >= that"):
        train(_tiny(steps=4), run, resume=True, progress=False)
    assert (run / "config.json").read_text() == before  # the refused resume wrote nothing


def test_partly_nan_rewards_are_dropped_and_training_goes_on(tmp_path, monkeypatch):
    # inf for every fourth fresh sample (scored without gradients), finite in the loss
    body = (
        "def r(x, c):\n    v = x.flatten(1).mean(1)\n"
        "    if not torch.is_grad_enabled():\n        v[::4] = float('inf')\n    return v\n"
    )
    mod = _reward_module(tmp_path, monkeypatch, body)
    cfg = _tiny(
        reward=f"{mod}:r",
        task="digits",
        estimator="tweedie",
        num_steps=3,
        batch_size=4,
        buffer_size=8,
        task_params={"classes": [1]},
    )
    run = train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["nonfinite_rewards"] == 6 and rows[-1]["skipped_updates"] == 0
    weights = load_file(str(run / "final" / "policy.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    # and it went on learning: the reward without its injected infinities rose
    assert_reward_rose(run, reward=lambda x0, cond: to_pixels(x0).flatten(1).mean(1))


def test_no_unsafe_loading_in_the_package():
    problems = []
    for path in (ROOT / "sqdf").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                problems.append(f"{path.name}: torch.load without weights_only=True")
        for pattern in (
            r"pickle\.loads?\(",
            r"Unpickler\(",
            r"allow_pickle\s*=\s*True",
            r"(?<![.\w])eval\(",
            r"(?<![.\w])exec\(",
            r"\bdill\b",
            r"joblib\.load",
        ):
            if re.search(pattern, text):
                problems.append(f"{path.name}: {pattern}")
    assert not problems, problems
