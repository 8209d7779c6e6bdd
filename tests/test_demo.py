"""sqdf demo, shrunk: SQDF and the KL-free baseline from the same start, a table with a
column per method, and a self-contained report that opens on the three grids."""

import json
import re

import pytest
import torch

from sqdf.cli import main
from sqdf.errors import ConfigError
from sqdf.evaluation.evaluate import load_run
from sqdf.experiments.demo import (
    BASELINE,
    BASELINE_FOLDER,
    PER_CLASS,
    PICTURE,
    demo_config,
    picture_samples,
    run_demo,
    summary_table,
)

TINY = dict(num_steps=4, batch_size=4, buffer_size=8, checkpoint_every=0)
IMAGE = r"<img src='data:image/png;base64,"


def _demo(out, **kw):
    return run_demo(out, num_samples=20, progress=False, quality_samples=8, steps=2, **TINY, **kw)


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory):
    return _demo(tmp_path_factory.mktemp("demo") / "demo")


def test_demo_writes_a_self_contained_report_of_both_methods(demo_page):
    run = demo_page.parent
    text = demo_page.read_text()
    # three grids, the two methods' reward curves, before/after, SQDF's curves, x̂0 (two)
    assert len(re.findall(IMAGE, text)) == 6
    assert "http" not in text.replace("https://", "").split("<body>")[1]  # nothing fetched
    picture = run / PICTURE
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert picture.stat().st_size < 200_000
    ours = json.loads((run / "eval.json").read_text())
    theirs = json.loads((run / BASELINE_FOLDER / "eval.json").read_text())
    assert {"eval_agreement", "ref_eval_agreement", "eval_frechet"} <= set(ours) & set(theirs)
    quality = json.loads((run / "x0_quality.json").read_text())
    assert len(quality["tweedie_rmse"]) == 3


def test_the_baseline_differs_from_sqdf_only_by_its_method(demo_page):
    run = demo_page.parent
    ours = json.loads((run / "config.json").read_text())["train"]
    theirs = json.loads((run / BASELINE_FOLDER / "config.json").read_text())["train"]
    assert (ours["method"], theirs["method"]) == ("sqdf", BASELINE)
    assert {k for k in ours if ours[k] != theirs.get(k)} == {"method"}
    # both evaluated on the same noise: the reference's numbers agree
    a = json.loads((run / "eval.json").read_text())
    b = json.loads((run / BASELINE_FOLDER / "eval.json").read_text())
    assert a["ref_reward_mean"] == b["ref_reward_mean"] and a["updates"] == b["updates"] == 2


def test_the_table_has_a_column_per_method_from_each_eval(demo_page):
    run = demo_page.parent
    columns, rows = summary_table(run)
    assert columns == ["reference", "sqdf", BASELINE, "real"]
    ours = json.loads((run / "eval.json").read_text())
    theirs = json.loads((run / BASELINE_FOLDER / "eval.json").read_text())
    table = dict(rows)
    assert table["reward"] == [ours["ref_reward_mean"], ours["reward_mean"],
                               theirs["reward_mean"], None]  # fmt: skip
    assert table["path KL to the reference"][:3] == [0.0, ours["kl_path"], theirs["kl_path"]]
    agreement = table["evaluator agreement with the class"]
    assert agreement == [ours["ref_eval_agreement"], ours["eval_agreement"],
                         theirs["eval_agreement"], ours["real_eval_agreement"]]  # fmt: skip
    assert table["Fréchet distance to real digits"][2] == theirs["eval_frechet"]
    assert table["within-class diversity"][2] == theirs["eval_diversity"]


def test_the_grids_share_noise_and_classes(demo_page):
    task = load_run(demo_page.parent)
    cond, (ref, ours, same) = picture_samples(task, task)
    assert torch.equal(torch.bincount(cond), torch.full((10,), PER_CLASS))
    assert torch.equal(ours, same)  # one policy twice: one noise gives one picture
    assert not torch.equal(ours, ref)  # the trained LoRA moved the samples
    _, (again, _, _) = picture_samples(task, task)
    assert torch.equal(ref, again)


def test_the_report_opens_on_the_three_grids_in_a_browser(demo_page):
    from tests.browser import chromium_or_skip, open_page

    chromium_or_skip()
    check = open_page(demo_page)
    assert check.errors == []
    assert check.images == check.images_loaded == 6  # every picture decodes
    ours = json.loads((demo_page.parent / "eval.json").read_text())
    theirs = json.loads((demo_page.parent / BASELINE_FOLDER / "eval.json").read_text())
    first = check.text.split("What ran")[0]  # the first section, before the settings
    assert "Left to right, the reference, SQDF and ReFL" in first
    for number in (ours["ref_reward_mean"], ours["reward_mean"], theirs["reward_mean"]):
        assert f"{number:.2f}" in first
    assert f"{100 * theirs['eval_agreement']:.0f}%" in first


def test_the_cli_prints_a_column_per_method_and_no_baseline_is_sqdf_alone(
    tmp_path, monkeypatch, capsys
):
    import sqdf.evaluation.x0_quality
    import sqdf.experiments.demo

    shrunk = sqdf.experiments.demo.demo_config
    monkeypatch.setattr(sqdf.experiments.demo, "demo_config", lambda **kw: shrunk(**{**TINY, **kw}))
    monkeypatch.setattr(
        sqdf.experiments.demo,
        "x0_estimator_quality",
        lambda task, num_samples: sqdf.evaluation.x0_quality.x0_estimator_quality(task, 8),
    )
    argv = ["demo", "--steps", "1", "--num-samples", "8", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "both")]) == 0
    out = capsys.readouterr().out
    assert _header(out) == ["metric", "reference", "sqdf", BASELINE, "real"]
    assert f"picture: {tmp_path / 'both' / PICTURE}" in out
    assert main([*argv, "--out", str(tmp_path / "alone"), "--no-baseline"]) == 0
    out = capsys.readouterr().out
    assert _header(out) == ["metric", "reference", "sqdf", "real"]
    assert "picture:" not in out
    # the page of SQDF alone: its grids and table, no baseline's run or picture
    alone = tmp_path / "alone"
    text = (alone / "report.html").read_text()
    assert len(re.findall(IMAGE, text)) == 4 and "Left to right" not in text
    assert not (alone / BASELINE_FOLDER).exists() and not (alone / PICTURE).exists()
    columns, _ = summary_table(alone)
    assert columns == ["reference", "sqdf", "real"]


def _header(out: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.startswith("metric"))


def test_demo_refuses_a_baseline_with_a_kl_term(tmp_path):
    with pytest.raises(ConfigError, match="demo baseline must be one of draft, refl"):
        run_demo(tmp_path / "demo", baseline="draft_kl")
    assert not (tmp_path / "demo").exists()


def test_demo_defaults_are_sqdf_with_all_enhancements():
    cfg = demo_config()
    assert (cfg.task, cfg.method, cfg.reward) == ("digits", "sqdf", "ink")
    assert cfg.estimator == "consistency"
    assert cfg.buffer == "prioritized"
    assert cfg.gamma < 1


def test_demo_refuses_an_existing_folder(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "x").write_text("")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
