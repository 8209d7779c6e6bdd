"""A finished run's final/README.md: Hub model-card metadata that huggingface_hub reads back,
and numbers equal to the run's own metrics.jsonl."""

from __future__ import annotations

import json
import shlex

from huggingface_hub import ModelCard, metadata_load

from sqdf.cli import main
from sqdf.model_card import write_model_card
from sqdf.run import read_metrics
from sqdf.settings import make_config

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
    assert "license" not in meta  # not known without the base's card
