"""The paper's rewards together on a tiny Stable Diffusion run: SQDF trained on a weighted
mixture of HPSv2 and ImageReward, then ``sqdf eval`` with both as cross-rewards (LPIPS,
DreamSim and FID in ``sqdf eval`` are tested in tests/tasks/test_sd_eval.py). The
mixture's number in eval.json is checked against its rewards' numbers, each scored on its own
over the same held-out images."""

from __future__ import annotations

import json

import pytest

from sqdf.cli import main
from sqdf.run.folder import read_metrics
from tests.rewards.test_hpsv2 import ARCH, write_tiny_hps
from tests.rewards.test_image_reward import tiny_vision, write_tiny_image_reward  # noqa: F401
from tests.tasks.sd_runs import write_tiny_parts

MIXTURE = {"hpsv2": 1.0, "imagereward": 0.5}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    parts = write_tiny_parts(root / "parts")
    hps = write_tiny_hps(root)[2]
    (root / "ir").mkdir()
    with pytest.MonkeyPatch.context() as m:  # the module's autouse patch is per test
        from tests.rewards.test_image_reward import blip_pretrain, tiny_vit

        m.setattr(blip_pretrain, "create_vit", tiny_vit)
        image_reward = write_tiny_image_reward(root / "ir")[1]
    params = {"hpsv2.checkpoint": str(hps), "hpsv2.arch": ARCH,
              **{f"imagereward.{k}": v for k, v in image_reward.items()}}  # fmt: skip
    return parts, params


def test_sqdf_on_a_mixture_then_eval_with_the_papers_rewards_and_metrics(weights, tmp_path):
    parts, params = weights
    run = tmp_path / "run"
    spec = ",".join(f"{n}={w}" for n, w in MIXTURE.items())
    argv = ["train", "--task", "sd", "--model", str(parts / "sd"), "--prompts", "varied",
            "--reward", spec, "--estimator", "tweedie", "--num-steps", "3", "--steps", "2",
            "--batch-size", "2", "--buffer-size", "4", "--lr", "1e-2", "--log-every", "1",
            "--device", "cpu", "--no-progress", "--out", str(run)]  # fmt: skip
    for key, value in params.items():
        argv += ["--reward-param", f"{key}={value}"]
    assert main(argv) == 0
    rows = read_metrics(run)
    for row in rows:  # each component logged, and the trained reward is their weighted sum
        total = sum(w * row[f"reward_{n}_mean"] for n, w in MIXTURE.items())
        assert total == pytest.approx(row["reward_mean"], rel=1e-5, abs=1e-6)
    # the first update starts at the reference: its gradient is the mixture's alone
    assert rows[0]["grad_norm"] > 0

    reward_params = [a for k, v in params.items() for a in ("--reward-param", f"{k}={v}")]
    code = main(["eval", str(run), "--rewards", "imagereward,hpsv2", "--per-prompt", "2",
                 "--prompts", "varied", "--device", "cpu", *reward_params])  # fmt: skip
    assert code == 0
    rewards = json.loads((run / "eval.json").read_text())["rewards"]
    # the mixture and each of its rewards, scored on their own over the same held-out images
    for key in ("mean", "ref_mean"):
        total = sum(w * rewards[n][key] for n, w in MIXTURE.items())
        assert total == pytest.approx(rewards[spec][key], rel=1e-5, abs=1e-6)
