"""The black-box optimisation guide's examples run as written and do what it says."""

import json
import shlex
from pathlib import Path

from sqdf.cli import main
from tests.doc_commands import doc_block


def run_example(start: str, folder: Path, monkeypatch) -> None:
    """Run the guide's one bash block that contains ``start``, in ``folder``."""
    monkeypatch.chdir(folder)
    example = doc_block("docs/guides/bbo.md", start)
    argv = shlex.split(example.strip())
    assert argv[0] == "sqdf" and main([*argv[1:], "--no-progress"]) == 0


def test_bbo_example_runs_and_sqdf_gains_oracle_reward(tmp_path, monkeypatch):
    run_example("sqdf bbo --task gmm2d", tmp_path, monkeypatch)
    out = tmp_path / "runs" / "bbo"
    assert (out / "bbo_curve.png").stat().st_size > 10000
    rounds = json.loads((out / "results.json").read_text())["methods"]["sqdf"]["rounds"]
    assert rounds[-1]["queries"] == 256
    # the guide says the oracle reward rose well above the reference's (round 0)
    assert rounds[-1]["oracle_mean"] > rounds[0]["oracle_mean"] + 3.0


def test_compare_bbo_example_runs(tmp_path, monkeypatch):
    run_example("sqdf compare --bbo", tmp_path, monkeypatch)
    summary = json.loads((tmp_path / "runs" / "compare-bbo" / "results.json").read_text())
    assert list(summary["methods"]) == ["sqdf", "seiko", "best_of_n"]
    assert all(m["rounds"][-1]["queries"] == 64 for m in summary["methods"].values())
