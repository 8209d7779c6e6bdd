"""sqdf demo, shrunk: it trains, evaluates and writes a self-contained report."""

import json
import re

from sqdf.cli import main
from sqdf.demo import demo_config, run_demo


def test_demo_writes_a_self_contained_report(tmp_path):
    page = run_demo(
        tmp_path / "demo", num_samples=20, progress=False, quality_samples=8,
        steps=2, num_steps=4, batch_size=4, buffer_size=8, checkpoint_every=0,
    )  # fmt: skip
    text = page.read_text()
    assert len(re.findall(r"<img src='data:image/png;base64,", text)) == 4
    assert "http" not in text.replace("https://", "").split("<body>")[1]  # nothing fetched
    metrics = json.loads((page.parent / "eval.json").read_text())
    assert {"eval_agreement", "ref_eval_agreement", "eval_frechet"} <= set(metrics)
    quality = json.loads((page.parent / "x0_quality.json").read_text())
    assert len(quality["tweedie_rmse"]) == 3


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
