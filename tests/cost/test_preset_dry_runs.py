"""Every train preset's dry run on a machine that has never reached the Hub prints the FLOPs
of an update, its traced memory and a fit verdict (the shipped configs shrunk to tiny networks
of the same classes, so that each trace takes seconds: tests/cost/conftest.py)."""

from __future__ import annotations

import re

import pytest

from sqdf.cli import main
from sqdf.run.settings import load_preset, preset_names

SD_TASK = ("sd15", "sdxl", "sd35m", "flux", "flow-grpo")
# a BBO preset is run by sqdf bbo, whose own dry run is tested below; sqdf train refuses it
# in one line
TRAIN_PRESETS = [name for name in preset_names() if not load_preset(name).is_bbo]
SCHNELL = "black-forest-labs/FLUX.1-schnell@741f7c3ce8b383c54771c7003378a50191e9efe9"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red bicycle\n")
    return prompts


def _phases(out: str) -> list[str]:
    return re.findall(r"^    ([a-zx̂0 ]+?)\s+[0-9.]+ [TG]FLOP", out, re.M)


@pytest.mark.parametrize("preset", TRAIN_PRESETS)
def test_every_preset_prints_flops_memory_and_a_verdict_offline(
    preset, offline, tiny_shipped, capsys
):
    argv = ["train", "--preset", preset, "--dry-run", "--gpu-memory", "24GiB"]
    if preset.startswith(SD_TASK):
        argv += ["--prompts", str(offline), "--task-param", "resolution=64"]
    if preset.startswith("digits"):  # its real networks run on the CPU: two samples do
        argv += ["--batch-size", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "not traced" not in out and "traced for" not in out
    assert _phases(out)[-1] == "total"
    assert re.search(r"^    peak of one update: [0-9.]+ [MG]iB", out, re.M)
    assert re.search(r"^  fit: (fits|does not fit) 24.00 GiB", out, re.M)
    # every weight it cannot list is listed as such, and counted in the total's "besides"
    unlisted = out.count(": not listed (not in the Hub cache")
    assert "weights not listed" not in out
    assert not unlisted or f"besides the {unlisted} not listed" in out
    if preset == "flux-dev-aesthetic":  # FLUX.1 schnell's transformer as its x̂0 network
        assert f"lcm: {SCHNELL}/transformer is not in the Hub cache" in out
        assert "configs sqdf ships for black-forest-labs/FLUX.1-schnell" in out
        assert "x̂0 model" in re.search(r"^    weights: (.*)$", out, re.M)[1]
    if preset == "flow-grpo-sd35-pickscore":
        # the policy-ratio update: no x̂0, decode or reward with gradients in its micro-batch
        assert _phases(out) == ["sampling", "scoring fresh", "policy step", "reference step",
                                "backward", "total"]  # fmt: skip
        # the model and PickScore's weights, the reward's listed as the model's is
        assert "PickScore_v1@a4e4367c6dfa7288a00c550414478f865b875800: not listed" in out
        assert unlisted == 2


def test_bbo_preset_dry_run_prints_flops_memory_and_a_verdict_offline(
    offline, tiny_shipped, capsys, tmp_path, monkeypatch
):
    """sqdf bbo's dry run of the BBO preset: its settings with their sources, the fine-tuning
    round's cost with the proxy as its reward, a fit verdict, and no run folder."""
    from sqdf.bbo.proxy import ProxyReward

    scored = []
    real_call = ProxyReward.__call__

    def call(self, x, cond=None):
        scored.append(x.shape)
        return real_call(self, x, cond)

    monkeypatch.setattr(ProxyReward, "__call__", call)
    monkeypatch.chdir(tmp_path)
    argv = ["bbo", "--preset", "sd15-bbo-aesthetic", "--dry-run", "--gpu-memory", "24GiB",
            "--prompts", str(offline), "--task-param", "resolution=64"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  bbo.updates_per_round\s+40\s+preset sd15-bbo-aesthetic$", out, re.M)
    assert re.search(r"^  bbo.proxy_steps\s+300\s+built-in$", out, re.M)
    assert "1024 + 2048 + 4096 + 8192 = 15,360 queries per method and seed" in out
    assert "3 x 40 = 120 updates" in out
    # best_of_n left out of the default methods: the preset's schedule varies
    assert (
        "methods: sqdf (sqdf against the proxy), seiko (draft_kl against the proxy), "
        "ddpo (ddpo against the oracle's values); seeds 0..1: 6 runs" in out
    )
    # the round's own settings, credited to sqdf bbo; the train dry run's sizes
    assert re.search(r"^  steps\s+40\s+sqdf bbo \(sqdf's rounds\)$", out, re.M)
    assert re.search(r"^  buffer_size\s+8192\s+sqdf bbo \(sqdf's rounds\)$", out, re.M)
    assert re.search(r"^  grad_accum\s+32\s+preset sd15-bbo-aesthetic$", out, re.M)
    assert (
        "reward traced: the BBO proxy (4 one-hidden-layer MLPs of 64 units on the CLIP "
        "image embeddings, one member drawn a round) over the CLIP of the aesthetic reward" in out
    )
    assert scored  # the traced update scored with the proxy, not the aesthetic head
    assert "not traced" not in out
    assert _phases(out)[-1] == "total"
    assert re.search(r"^    peak of one update: [0-9.]+ [MG]iB", out, re.M)
    assert re.search(r"^  fit: (fits|does not fit) 24.00 GiB", out, re.M)
    assert "weights (Hub references" in out
    assert list(tmp_path.iterdir()) == [tmp_path / "prompts.txt"]  # no run folder
