"""A finished run's final/README.md: Hub model-card metadata that huggingface_hub reads back,
and numbers equal to the run's own metrics.jsonl."""

from __future__ import annotations

import json
import shlex

import pytest
from huggingface_hub import ModelCard, metadata_load

from sqdf.cli import main
from sqdf.run.folder import read_metrics
from sqdf.run.model_card import base_model_of, reward_tags, write_model_card
from sqdf.run.settings import make_config

TINY = ["--num-steps", "3", "--steps", "3", "--batch-size", "2", "--buffer-size", "4",
        "--device", "cpu", "--no-progress"]  # fmt: skip


def test_a_finished_run_has_a_card_the_hub_client_reads_with_the_runs_numbers(tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--sample-every", "2", "--log-every", "1", *TINY]
    assert main(argv) == 0
    path = run / "final" / "README.md"
    card = ModelCard.load(path)  # parses the YAML header as the Hub does
    meta = metadata_load(path)
    assert card.data.to_dict() == meta
    assert {"sqdf", "linear"} <= set(meta["tags"])
    assert "lora" not in meta["tags"]  # gmm2d fine-tunes its whole network
    assert "base_model" not in meta and "library_name" not in meta  # gmm2d: no Hub base
    rows = read_metrics(run)
    for key in ("reward_mean", "kl_mean"):
        got = meta["sqdf_metrics"][key]
        assert (got["first_update"], got["first"]) == (rows[0]["step"], rows[0][key])
        assert (got["last_update"], got["last"]) == (rows[-1]["step"], rows[-1][key])
        assert f"{rows[-1][key]:.6g} (update {rows[-1]['step']})" in card.text
    assert f"sqdf {shlex.join(argv)}" in card.text
    config = json.loads((run / "config.json").read_text())["train"]
    assert json.dumps(config, indent=1) in card.text  # the settings, as config.json has them
    assert (run / "final" / "samples.png").read_bytes() == sorted(
        (run / "samples").glob("step_*.png")
    )[-1].read_bytes()
    assert "![samples](samples.png)" in card.text


def test_an_sd_card_names_its_hub_base_its_licence_and_what_it_did_not_measure(tmp_path):
    base = tmp_path / "sd15"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# SD\n")
    values = {"task": "sd", "reward": "aesthetic", "task_params": {"model": str(base)}}
    folder = tmp_path / "final"
    folder.mkdir()
    run = tmp_path / "run"  # no metrics.jsonl: nothing measured
    run.mkdir()
    write_model_card(folder, run, make_config(values), "aesthetic", None)
    meta = metadata_load(folder / "README.md")
    assert meta["license"] == "creativeml-openrail-m"  # the base folder's own card's
    assert meta["library_name"] == "diffusers"
    assert meta["tags"][:2] == ["lora", "sqdf"] and "aesthetic" in meta["tags"]
    assert "base_model" not in meta  # a local folder is not a Hub id
    assert meta["sqdf_metrics"] == {"reward_mean": "unmeasured", "kl_mean": "unmeasured"}
    text = (folder / "README.md").read_text()
    assert "| unmeasured | unmeasured |" in text and "No sample grid" in text

    values["task_params"]["model"] = "stable-diffusion-v1-5/stable-diffusion-v1-5@451f4fe"
    write_model_card(folder, run, make_config(values), "aesthetic", "sqdf train ...")
    meta = metadata_load(folder / "README.md")
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert "license" not in meta  # offline, and the base's card is not in the Hub cache
    assert "The base model's: unknown" in (folder / "README.md").read_text()


COMMIT = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"
REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def _cached_card(cache, repo: str, commit: str, text: str) -> None:
    """The base model's README.md in a Hub cache at ``commit``, laid out as huggingface_hub
    lays it (blob, snapshot, ref)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True)
    (root / "blobs" / "card").write_text(text)
    (root / "snapshots" / commit).mkdir(parents=True)
    (root / "snapshots" / commit / "README.md").symlink_to(root / "blobs" / "card")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def test_a_hub_base_models_licence_is_read_from_its_card_at_the_trained_commit(
    tmp_path, monkeypatch
):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    _cached_card(cache, REPO, COMMIT, "---\nlicense: creativeml-openrail-m\n---\n# SD 1.5\n")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    run = tmp_path / "run"
    run.mkdir()
    # the run was given the branch; its record pins the commit it trained on
    (run / "config.json").write_text(json.dumps({"weights": {REPO: {"commit": COMMIT}}}))
    folder = tmp_path / "final"
    folder.mkdir()
    values = {"task": "sd", "reward": "aesthetic", "task_params": {"model": REPO}}
    write_model_card(folder, run, make_config(values), "aesthetic", None)
    meta = metadata_load(folder / "README.md")
    assert meta["license"] == "creativeml-openrail-m" and meta["base_model"] == REPO
    text = (folder / "README.md").read_text()
    assert f"DiffusionPipeline.from_pretrained({REPO!r}, revision={COMMIT!r})" in text


@pytest.mark.parametrize(
    "model", ["hf://org/name@v1", "org/name/unet", "org/name@0123abc/unet", "org/name"]
)
def test_base_model_is_the_repository_of_any_hub_reference(model):
    cfg = make_config({"task": "sd", "reward": "aesthetic", "task_params": {"model": model}})
    assert base_model_of(cfg) == "org/name"


@pytest.mark.parametrize(
    "reward, tags",
    [("aesthetic", ["aesthetic"]), ("linear=1,quadratic=1", ["linear", "quadratic"]),
     ("linear#a=1,linear#b=2", ["linear"]), ("my_pkg.rewards:Sharp_Score", ["sharp-score"])],
)  # fmt: skip
def test_reward_tags_are_its_components_as_valid_tags(reward, tags):
    assert reward_tags(reward) == tags


def test_a_card_that_fails_leaves_final_whole_with_a_one_line_warning(
    tmp_path, monkeypatch, capsys
):
    import sqdf.training.saving

    def broken(*args, **kwargs):
        raise ValueError("card metadata does not validate\nsecond line")

    monkeypatch.setattr(sqdf.training.saving, "write_model_card", broken)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    assert (run / "final" / "policy.safetensors").is_file()
    assert not (run / "final" / "README.md").exists()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "model card" in line]
    assert warnings == [
        f"sqdf: warning: no model card in {run / 'final'}: card metadata does not validate"
    ]


def test_a_card_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails half-way (here: before its flush) leaves the card there was."""
    import sqdf.infra.atomic

    folder, run = tmp_path / "final", tmp_path / "run"
    folder.mkdir()
    run.mkdir()
    (folder / "README.md").write_text("the card there was")

    def crash(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sqdf.infra.atomic, "fsync_path", crash)
    values = {"task": "gmm2d", "reward": "linear"}
    with pytest.raises(OSError):
        write_model_card(folder, run, make_config(values), "linear", None)
    assert (folder / "README.md").read_text() == "the card there was"
