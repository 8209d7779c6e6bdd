"""The commands that rebuild the shipped digits weights produce loadable models (a few steps)."""

import json

from sqdf.cli import main
from sqdf.rewards import build_reward
from sqdf.tasks.digits_model import load_unet


def test_pretrain_distill_and_train_reward(tmp_path):
    base = tmp_path / "digits"
    assert main(["pretrain", "--out", str(base), "--steps", "2", "--no-progress"]) == 0
    assert main(["distill-cm", "--base", str(base), "--steps", "2", "--no-progress"]) == 0
    reward_file = base / "reward_cnn.safetensors"
    assert main(["train-reward", "--out", str(reward_file), "--steps", "3", "--no-progress"]) == 0
    for sub in ("unet", "cm"):
        load_unet(base / sub, sub)
        assert json.loads((base / sub / "train_log.json").read_text())["config"]["steps"] == 2
    assert (base / "scheduler" / "scheduler_config.json").exists()
    reward = build_reward("classifier", {"weights": str(reward_file)})
    assert 0 <= json.loads(reward_file.with_suffix(".json").read_text())["held_out_accuracy"] <= 1
    assert reward.target is None
