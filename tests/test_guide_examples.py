"""The guides' examples that say what they do, run as written (shrunk where they say so) and
checked for it: the Python API's, the 2-D benchmark's, the frontier's and the isotropic
Gaussian posterior's."""

import json
import shlex

from sqdf.cli import main
from tests.doc_commands import doc_block


def test_python_guide_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = doc_block("docs/guides/python.md", "from sqdf import TrainConfig", "python")
    exec(compile(code, "docs/guides/python.md", "exec"), {"__name__": "__guide__"})
    out = capsys.readouterr().out
    assert "mode TV to the exact target" in out
    assert "32 0.1 prioritized" in out  # config_for: the digits task's defaults
    assert (tmp_path / "runs" / "python-demo" / "eval.json").exists()


def test_gmm2d_guide_example_moves_towards_the_exact_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    example = doc_block("docs/guides/gmm2d.md", "--estimator tweedie --out runs/gmm2d\n")
    for line in example.strip().splitlines():
        argv = shlex.split(line)
        assert argv[0] == "sqdf"
        assert main([*argv[1:], "--no-progress"] if argv[1] == "train" else argv[1:]) == 0
    metrics = json.loads((tmp_path / "runs" / "gmm2d" / "eval.json").read_text())
    assert metrics["target_mode_tv"] < metrics["ref_target_mode_tv"]
    assert metrics["target_sliced_w2"] < metrics["ref_target_sliced_w2"]


def test_frontier_example_runs(tmp_path, monkeypatch):
    """The compare guide's --frontier command as written, shrunk to seconds by flags appended after
    it (later flags win): 5 sampling steps, 3 updates, 64 evaluation samples, one seed."""
    monkeypatch.chdir(tmp_path)
    line = doc_block("docs/guides/compare.md", "sqdf compare --task gmm2d --frontier").strip()
    argv = shlex.split(line)[1:] + [
        "--set", "num_steps=5", "--steps", "3", "--set", "batch_size=8", "--set", "buffer_size=16",
        "--set", "task_params={hidden = 8}", "--set", "estimator=tweedie", "--num-samples", "64",
        "--seeds", "1", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    table = (tmp_path / "runs" / "frontier" / "frontier.md").read_text()
    for row in (
        "| sqdf | alpha=4 |",
        "| sqdf | alpha=0.25 |",
        "| draft_kl | alpha=",
        "| best_of_n | best_of=64 |",
    ):
        assert row in table, row


def test_isotropic_posterior_example_runs(tmp_path, monkeypatch):
    """The gmm2d guide's digits command with the isotropic Gaussian posterior, shrunk by flags
    appended after it: 2 updates of 4 trajectories, 4 steps."""
    monkeypatch.chdir(tmp_path)
    line = doc_block("docs/guides/gmm2d.md", "--q-cov isotropic").strip()
    argv = shlex.split(line)
    assert argv[0] == ".venv/bin/sqdf"
    argv = argv[1:] + [
        "--num-steps", "4", "--steps", "2", "--batch-size", "4", "--buffer-size", "8",
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    run = tmp_path / "runs" / "digits-posterior"
    config = json.loads((run / "config.json").read_text())["train"]
    assert (config["estimator"], config["q_cov"], config["q_draws"]) == (
        "gaussian_posterior", "isotropic", 8,
    )  # fmt: skip
    assert sorted(run.glob("**/*.safetensors")), "no policy saved"
    losses = [json.loads(line).get("loss") for line in (run / "metrics.jsonl").open()]
    assert any(v is not None for v in losses) and all(
        v is None or v == v for v in losses
    ), losses  # fmt: skip
