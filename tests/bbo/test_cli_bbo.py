"""sqdf bbo on the command line: outputs, resume, help, and bad input as one line, status 2."""

import json

import pytest

from sqdf.cli import main

TINY = ["--set", "num_steps=4", "--set", "batch_size=8", "--set", "buffer_size=16",
        "--set", "device='cpu'", "--set", "estimator='tweedie'", "--set", "task_params={hidden=8}",
        "--rounds", "2", "--queries-per-round", "6", "--updates-per-round", "2",
        "--proxy-steps", "10", "--seeds", "1", "--no-progress"]  # fmt: skip


def test_bbo_writes_the_query_data_metrics_and_curve(tmp_path, capsys):
    out = tmp_path / "b"
    assert (
        main(["bbo", "--methods", "sqdf,draft,alignprop,best_of_n", "--out", str(out), *TINY]) == 0
    )
    assert "| sqdf | 12 |" in capsys.readouterr().out
    for name in ("results.json", "results.md", "bbo_curve.png", "bbo.json"):
        assert (out / name).is_file()
    run = out / "runs" / "draft-seed0"
    assert sorted(p.name for p in (run / "queries").iterdir()) == [
        "round_0000.safetensors",
        "round_0001.safetensors",
    ]
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["queries"] for r in rows] == [6, 12] and "proxy_rmse" in rows[1]
    assert (
        json.loads((run / "train" / "round_0000" / "config.json").read_text())["resolved"]["reward"]
        == "proxy"
    )
    # resuming a finished folder sends nothing and rewrites the same results
    before = (out / "results.md").read_text()
    assert main(["bbo", "--resume", str(out), "--no-progress"]) == 0
    assert (out / "results.md").read_text() == before


def test_bbo_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bbo", "--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0
    assert "--queries-per-round" in text and "--drop-bad-queries" in text and "examples:" in text


CASES = [
    (["--methods", "sqdf,seeko"], "did you mean 'seiko'?"),
    (["--rounds", "0"], "rounds must be >= 1"),
    (["--queries-per-round", "1"], "queries_per_round must be >= 2"),
    (["--kappa", "-1"], "kappa must be >= 0"),
    (["--optimism", "greedy"], "unknown optimism 'greedy'"),
    (["--oracle", "nonsense"], "oracle must be 'task' or module:function"),
    (["--oracle", "no_such_mod:f"], "cannot import module 'no_such_mod'"),
    (
        ["--oracle", "no_such_mod:f", "--dry-run"],  # found without running it, as the run would
        "cannot import module 'no_such_mod' for oracle 'no_such_mod:f': no module of that name",
    ),
    (["--oracle-param", "x=1"], "oracle_params are for a module:function oracle"),
    (["--set", "alhpa=1"], "did you mean 'alpha'"),
    (["--seeds", "0"], "seeds must be >= 1"),
    (["--dry-run", "--gpu-memory", "0"], "--gpu-memory '0': give a size such as 24GiB"),
]


@pytest.mark.parametrize("extra,expected", CASES, ids=[c[1] for c in CASES])
def test_bad_bbo_input(extra, expected, tmp_path, capsys):
    argv = ["bbo", "--out", str(tmp_path / "x"), *TINY, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()  # nothing half-made to clean up before a retry


def test_bad_resume(tmp_path, capsys):
    assert main(["bbo", "--resume", str(tmp_path)]) == 2
    assert "not an sqdf bbo folder" in capsys.readouterr().err
    assert main(["bbo", "--resume", str(tmp_path), "--rounds", "3"]) == 2
    assert "give no other options" in capsys.readouterr().err
    assert main(["bbo", "--resume", str(tmp_path), "--dry-run"]) == 2  # a plan has no resume
    assert "give no other options" in capsys.readouterr().err


def test_compare_bbo_runs_the_bbo_methods_side_by_side(tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["compare", "--bbo", "--methods", "sqdf,seiko,best_of_n", "--out", str(out), *TINY]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| seiko | 12 |" in text and "sqdf bbo --resume" in text
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["methods"]) == ["sqdf", "seiko", "best_of_n"]
    assert (out / "bbo_curve.png").is_file()
    # the same experiment as sqdf bbo: its query data resume the same way
    assert main(["bbo", "--resume", str(out), "--no-progress"]) == 0


COMPARE_CASES = [
    (["--bbo", "--steps", "5"], "--steps is not a --bbo setting"),
    (["--bbo", "--sweep", "gamma=1,0.9"], "--sweep is not a --bbo setting"),
    (["--bbo", "--methods", "refl"], "unknown bbo method 'refl'"),
    (["--rounds", "3"], "--rounds is a BBO setting; add --bbo"),
    (["--oracle-param", "x=1"], "--oracle-param is a BBO setting; add --bbo"),
]


@pytest.mark.parametrize("extra,expected", COMPARE_CASES, ids=[c[1] for c in COMPARE_CASES])
def test_bad_compare_bbo_input(extra, expected, tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path / "x"), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_a_query_schedule_sizes_each_round(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "s"
    argv = [a for a in TINY if a not in ("--queries-per-round", "6")]
    assert main(["bbo", "--methods", "sqdf", "--query-schedule", "4,10", "--out", str(out),
                 *argv]) == 0  # fmt: skip
    run = out / "runs" / "sqdf-seed0"
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["queries"] for r in rows] == [4, 14]
    sizes = [load_file(str(run / "queries" / f"round_000{k}.safetensors"))["value"].shape[0]
             for k in range(2)]  # fmt: skip
    assert sizes == [4, 10]
    assert json.loads((out / "results.json").read_text())["budget"] == 14


def test_dry_run_takes_a_task_reward_without_a_gradient(tmp_path, monkeypatch, capsys):
    """A round trains on the proxy (train skips the reward-gradient check for it), so a real
    run takes an oracle reward without a gradient; its dry run must not refuse what the run
    takes (it did: the round's method sqdf back-propagates the task's reward)."""
    (tmp_path / "user_far.py").write_text("def far(x, cond):\n    return x.norm(dim=1).detach()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    argv = ["bbo", "--task", "gmm2d", "--set", "reward='user_far:far'", "--reward-param",
            "differentiable=false", "--methods", "sqdf", "--dry-run"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "each fine-tuning round of sqdf is this sqdf train run:" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user_far.py"]  # no run folder
