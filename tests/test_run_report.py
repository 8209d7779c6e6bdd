"""sqdf report: one self-contained page per run, for every task, shown by a real browser."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from sqdf.cli import main
from sqdf.evaluation.evaluate import evaluate_run
from sqdf.training.trainer import train

IMAGE = re.compile(r"<img src='data:image/png;base64,[A-Za-z0-9+/=]+'")


def images(page) -> int:
    return len(IMAGE.findall(page.read_text()))


def self_contained(page) -> bool:
    body = page.read_text().split("<body>", 1)[1]
    return not re.search(r"(src|href)=['\"](?!data:)", body)


@pytest.fixture(scope="module")
def gmm2d_run(tmp_path_factory):
    from sqdf.config.train_config import TrainConfig

    cfg = TrainConfig(num_steps=10, steps=6, batch_size=16, buffer_size=64, log_every=2,
                      checkpoint_every=0, device="cpu", estimator="tweedie",
                      task_params={"hidden": 16}, sample_every=1, eval_every=3)  # fmt: skip
    return train(cfg, tmp_path_factory.mktemp("gmm") / "run", progress=False)


def test_a_gmm2d_report_evaluates_the_run_and_shows_every_part(gmm2d_run, capsys):
    assert not (gmm2d_run / "eval.json").exists()
    assert main(["report", str(gmm2d_run), "--no-progress"]) == 0
    page = gmm2d_run / "report.html"
    assert f"wrote {page}" in capsys.readouterr().out
    metrics = json.loads((gmm2d_run / "eval.json").read_text())  # evaluated on the way
    text = page.read_text()
    for heading in ("What ran", "Before and after", "Training curves",
                    "Pictures during training", "Evaluation (trained reward: linear)"):  # fmt: skip
        assert f"<h2>{heading}" in text
    # before/after, curves, 4 of the 6 training pictures (first and last among them)
    assert images(page) == 1 + 1 + 4 and self_contained(page)
    assert "update 1</p>" in text and "update 6</p>" in text
    assert "<th>exact target</th>" in text
    assert f"<td>{metrics['target_mode_tv']:.4g}</td>" in text
    assert "<td>updates done</td><td>6</td>" in text


def test_a_report_shows_cross_rewards_of_a_digits_run(tmp_path):
    from sqdf.evaluation.run_report import write_run_report
    from sqdf.run.settings import config_for

    run = train(config_for("digits", steps=2, batch_size=4, num_steps=4), tmp_path / "d",
                progress=False)  # fmt: skip
    metrics = evaluate_run(run, num_samples=20, rewards={"classifier": {}})
    page = write_run_report(run)
    text = page.read_text()
    assert "<td>classifier (not trained on)</td>" in text and "<th>real digits</th>" in text
    assert f"<td>{metrics['eval_agreement']:.4g}</td>" in text
    assert images(page) == 2 and self_contained(page)


def test_an_sd_report_has_the_per_prompt_table(tmp_path):
    from tests.tasks.sd_runs import sd_config, write_tiny_parts

    write_tiny_parts(tmp_path)
    run = train(sd_config(tmp_path / "sd", tmp_path, steps=1), tmp_path / "run", progress=False)
    rewards = {"clipscore": {"model": str(tmp_path / "clip")}}
    evaluate_run(run, per_prompt=2, rewards=rewards)
    assert main(["report", str(run), "--no-progress"]) == 0
    text = (run / "report.html").read_text()
    assert "<h3>Per prompt</h3>" in text and "<td>a penguin</td>" not in text
    assert "<td>penguin</td>" in text and "<td>aesthetic (trained)</td>" in text
    assert "<td>clipscore</td>" in text and "<td>task_params.eval_prompts</td>" in text


def test_a_report_of_an_unfinished_run_is_one_line(tiny_config, tmp_path, capsys):
    cfg = dataclasses.replace(tiny_config, steps=2)
    run = train(cfg, tmp_path / "run", progress=False)
    (run / "final" / "policy.safetensors").unlink()
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "has no final weights" in err and "Traceback" not in err


def test_the_report_opens_in_a_browser_without_errors(gmm2d_run):
    from tests.browser import chromium_or_skip, open_page

    chromium_or_skip()
    page = gmm2d_run / "report.html"
    if not page.exists():
        assert main(["report", str(gmm2d_run), "--no-progress"]) == 0
    check = open_page(page)
    assert check.errors == []
    assert check.images == images(page) == check.images_loaded
    assert "Before and after" in check.text and "exact target" in check.text


def test_watching_guide_report_block_runs(tmp_path, monkeypatch):
    import shlex

    from tests.tasks.sd_runs import doc_lines

    monkeypatch.chdir(tmp_path)
    lines = doc_lines("docs/guides/watching.md", "sqdf report runs/digits-watched")
    quick = ["--steps", "4", "--eval-every", "4", "--sample-every", "4", "--num-steps", "4",
             "--batch-size", "4", "--no-progress"]  # fmt: skip
    train_argv = shlex.split(lines[0])[1:]
    assert main(train_argv + quick) == 0
    # evaluated small first: the report then uses this eval.json, not 1,000 fresh samples
    assert main(["eval", "runs/digits-watched", "--num-samples", "20", "--no-progress"]) == 0
    assert main(shlex.split(lines[1])[1:] + ["--no-progress"]) == 0
    page = tmp_path / "runs/digits-watched/report.html"
    assert images(page) == 1 + 1 + 1 and self_contained(page)


def test_a_report_after_a_resume_evaluates_the_new_weights(tiny_config, tmp_path, capsys):
    from sqdf.evaluation.run_report import write_run_report

    cfg = dataclasses.replace(tiny_config, steps=2, checkpoint_every=2)
    run = train(cfg, tmp_path / "run", progress=False)
    before = evaluate_run(run, num_samples=64)
    assert before["updates"] == 2
    write_run_report(run)  # eval.json is current: kept as it is
    assert json.loads((run / "eval.json").read_text()) == before
    train(dataclasses.replace(cfg, steps=4), run, resume=True, progress=False)
    write_run_report(run)
    assert "evaluating again" in capsys.readouterr().err
    after = json.loads((run / "eval.json").read_text())
    assert (
        after["updates"] == 4
        and "<td>updates done</td><td>4</td>" in (run / "report.html").read_text()
    )
