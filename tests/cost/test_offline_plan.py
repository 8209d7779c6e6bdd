"""A preset's dry run on a machine that has never reached the Hub: the model is planned and
traced from the configs sqdf ships for its repository, and what cannot be listed is said."""

from __future__ import annotations

import re

import huggingface_hub.constants
import pytest

from sqdf.cli import main
from sqdf.cost.model_configs import shipped_component_for, shipped_for, write_config_folder

SMALL = ["--task-param", "resolution=128", "--gpu-memory", "24GiB"]  # a quick trace


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _cost(out: str) -> str:
    return out[out.index("cost of one update") : out.index("weights (Hub references")]


def test_shipped_configs_are_found_by_repository_at_any_revision():
    assert shipped_for("stable-diffusion-v1-5/stable-diffusion-v1-5@451f4fe") == "sd15"
    assert shipped_for("hf://stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"
    assert shipped_for("black-forest-labs/FLUX.1-dev") == "fluxdev"
    assert shipped_for("black-forest-labs/FLUX.1-schnell@741f7c3") == "fluxschnell"
    assert shipped_component_for("black-forest-labs/FLUX.1-schnell@741f7c3/transformer") == (
        "fluxschnell", "transformer")  # fmt: skip
    assert shipped_component_for("black-forest-labs/FLUX.1-schnell/ae.safetensors") is None
    for other in ("org/name", "/models/sd15",
                  "stable-diffusion-v1-5/stable-diffusion-v1-5/unet/config.json"):  # fmt: skip
        assert shipped_for(other) is None


def test_an_sd15_preset_plans_offline_as_from_a_folder_of_those_configs(
    empty_cache, tmp_path, capsys
):
    assert main(["train", "--preset", "sd15-aesthetic", "--dry-run", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "traced from the configs sqdf ships for stable-diffusion-v1-5" in out
    assert "fit: fits 24.00 GiB" in out
    # the LCM-LoRA cannot be listed either: said once, and the plan goes on
    assert out.count("lcm-lora-sdv1-5@cf2fced511dbe7e26c8d1d397e728fbab875db4b/"
                     "pytorch_lora_weights.safetensors: not listed") == 1  # fmt: skip
    # the model itself is not listed either, nor the reward's CLIP (listed with the others,
    # not on a line of its own), and the total says it leaves all three out
    assert "stable-diffusion-v1-5@451f4fe16113bff5a5d2269ed5ad43b0592e9a14: not listed" in out
    assert "openai/clip-vit-large-patch14@32bd64288804d66eefd0ccbe215aa642df71cc41: not " \
           "listed" in out  # fmt: skip
    assert "weights not listed" not in out
    assert "to download into" in out and "besides the 3 not listed" in out
    # the same trace as from a local folder holding those configs
    folder = write_config_folder("sd15", tmp_path / "sd15")
    argv = ["train", "--preset", "sd15-aesthetic", "--dry-run", "--model", str(folder), *SMALL]
    assert main(argv) == 0
    assert _cost(capsys.readouterr().out) == _cost(out)


def test_an_unreachable_consistency_network_is_not_sized(empty_cache, capsys):
    # an x̂0 network sqdf ships no configs for: a second network a trace without its config
    # would leave out (FLUX.1 schnell's, FLUX.1-dev's preset's own, is shipped)
    lcm = "org/distilled-flux@0123456789abcdef0123456789abcdef01234567/transformer"
    argv = ["train", "--preset", "flux-dev-aesthetic", "--dry-run", "--task-param", f"lcm={lcm}"]
    assert main([*argv, *SMALL]) == 0
    out = capsys.readouterr().out
    assert "traced from the configs sqdf ships for black-forest-labs/FLUX.1-dev" in out
    assert f"cost of one update: not traced (the consistency model {lcm} is not" in out
    assert "fit:" not in out


def test_the_flow_grpo_preset_shows_flow_grpos_run_offline(
    empty_cache, tiny_shipped, tmp_path, capsys
):
    """`sqdf train --preset flow-grpo-sd35-pickscore --dry-run` on a machine without the Hub:
    Flow-GRPO's SD 3.5 PickScore run as the preset writes it (tests/test_settings.py pins
    each value to its source), traced from the shipped SD 3.5 Medium configs."""
    prompts = tmp_path / "prompts.txt"  # Flow-GRPO's dataset/pickscore is not shipped
    prompts.write_text("a photo of a cat\na red bicycle\n")
    argv = ["train", "--preset", "flow-grpo-sd35-pickscore", "--prompts", str(prompts)]
    assert main([*argv, "--dry-run", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "traced from the configs sqdf ships for stabilityai/stable-diffusion-3.5-medium" in out
    assert re.search(r"^  method\s+grpo\s", out, re.M)
    assert re.search(r"^  method_params\.kl_scale\s+'flow_grpo'\s", out, re.M)
    assert re.search(r"^  method_params\.group_size\s+24\s", out, re.M)
    assert "effective batch: 432 cells per update = 48 per micro-batch x 1 process(es) x 9" in out
    # its own update traced (tests/cost/test_preset_dry_runs.py checks its phases)
    assert "cost of one update (traced estimates, not measurements; method grpo" in out


def test_a_plan_refuses_a_missing_local_lcm(empty_cache, tmp_path, capsys):
    # a local LCM folder that is not there is a mistake in a plan as in a run
    argv = ["train", "--preset", "sdxl-aesthetic", "--dry-run", "--task-param",
            f"lcm={tmp_path / 'no_such_lcm'}"]  # fmt: skip
    assert main(argv) == 2
    assert "sd lcm: no such folder or file" in capsys.readouterr().err


def test_an_online_plan_traces_with_an_lcm_lora_it_has_not_downloaded(
    tmp_path, monkeypatch, capsys
):
    """Online, a plan resolves the LCM-LoRA to where it would be saved (not there yet); the
    LoRA is not a network the trace sizes, so the cost is traced and the file listed."""
    import huggingface_hub
    from huggingface_hub.file_download import DryRunFileInfo

    def planned(repo, path, revision=None, dry_run=False, **_):  # the Hub's dry-run answer
        assert dry_run
        local = tmp_path / "hub" / repo.replace("/", "--") / revision / path
        return DryRunFileInfo(
            commit_hash=revision, file_size=134_621_556, filename=path, is_cached=False,
            local_path=str(local), will_download=True,
        )  # fmt: skip

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", planned)
    folder = write_config_folder("sd15", tmp_path / "sd15")
    argv = ["train", "--preset", "sd15-aesthetic", "--model", str(folder), "--dry-run", *SMALL]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fit: fits 24.00 GiB" in out
    assert "pytorch_lora_weights.safetensors: latent-consistency/lcm-lora-sdv1-5@cf2fced511db, " \
           "1 file(s), 134.6 MB to download" in out  # fmt: skip
