"""sqdf compare, tiny: outputs are produced and well-formed; divergence is a result."""

import json

import pytest

from sqdf.cli import main
from sqdf.compare import BEST_OF_N, compare, plan_variants
from sqdf.errors import SqdfError

BASE = dict(
    task="gmm2d",
    num_steps=5,
    steps=4,
    batch_size=8,
    buffer_size=16,
    log_every=2,
    checkpoint_every=0,
    device="cpu",
    estimator="tweedie",
    task_params={"hidden": 8},
)


def test_compare_two_methods_and_best_of_n(tmp_path):
    out = compare(
        BASE,
        ["sqdf", "draft", BEST_OF_N],
        1,
        tmp_path / "c",
        num_samples=64,
        best_of=4,
        progress=False,
    )
    doc = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in doc["runs"]] == ["sqdf", "draft", BEST_OF_N]
    for r in doc["runs"]:
        for key in ("reward_mean", "target_mode_tv", "target_sliced_w2", "reward_evals", "wall_s"):
            assert key in r
    assert doc["runs"][0]["updates"] == 4 and doc["runs"][2]["updates"] == 0
    # best-of-N is scored as the trained runs are: against the same reference draws
    sqdf_run, _, best = doc["runs"]
    for key in ("ref_reward_mean", "ref_target_mode_tv", "ref_target_sliced_w2"):
        assert best[key] == sqdf_run[key], key
    table = (out / "results.md").read_text()
    assert (
        table.count("\n| ") >= 4 and "target_mode_tv" in table and "Mean ± std over 1 seed" in table
    )
    for png in ("pareto.png", "curves.png", "samples.png"):
        assert (out / png).stat().st_size > 5000


def test_sweep_and_ddpo_gets_its_buffer(tmp_path):
    out = compare(
        BASE,
        ["sqdf"],
        2,
        tmp_path / "s",
        sweep=("gamma", [1.0, 0.5]),
        num_samples=32,
        progress=False,
    )
    doc = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in doc["runs"]] == [
        ("gamma=1.0", 0),
        ("gamma=1.0", 1),
        ("gamma=0.5", 0),
        ("gamma=0.5", 1),
    ]
    table = (out / "results.md").read_text()
    assert "±" in table and "- target_kl " in table  # gamma leaves the target where it is
    # alpha moves the exact target: the notes give its figures per variant
    out = compare(BASE, ["sqdf"], 1, tmp_path / "a", sweep=("alpha", [0.5, 2.0]),
                  num_samples=32, progress=False)  # fmt: skip
    (line,) = [x for x in (out / "results.md").read_text().splitlines() if "target_kl" in x]
    assert line.startswith("- target_kl: alpha=0.5 ") and ", alpha=2.0 " in line
    out = compare(BASE, ["ddpo"], 1, tmp_path / "d", num_samples=32, progress=False)
    cfg = json.loads((out / "runs" / "ddpo-seed0" / "config.json").read_text())
    assert cfg["train"]["buffer"] == "on_policy"


def test_a_diverging_run_is_recorded_not_fatal(tmp_path, monkeypatch):
    (tmp_path / "nan_reward.py").write_text(
        "import torch\ndef r(x, c):\n    return x.flatten(1).sum(1) * float('nan')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    base = {
        **BASE,
        "reward": "nan_reward:r",
        "max_skips": 2,
        "task": "digits",
        "task_params": {"classes": [1]},
        "num_steps": 3,
        "batch_size": 2,
        "buffer_size": 4,
    }
    out = compare(base, ["sqdf"], 1, tmp_path / "n", num_samples=8, progress=False)
    doc = json.loads((out / "results.json").read_text())
    assert "diverged" in doc["runs"][0] and "1/1" in (out / "results.md").read_text()


def test_bad_compare_input(tmp_path, capsys):
    with pytest.raises(SqdfError, match="unknown method 'ppo'"):
        plan_variants(["ppo"], None)
    assert (
        main(["compare", "--methods", "sqdf", "--sweep", "gamma", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "--sweep expects KEY=V1,V2" in capsys.readouterr().err
    assert main(["compare", "--set", "alhpa=1", "--out", str(tmp_path / "y")]) == 2
    assert "did you mean 'alpha'" in capsys.readouterr().err
    # a variant's bad setting is found before any variant trains
    argv = ["compare", "--sweep", "alpha=0.5,0", "--out", str(tmp_path / "z")]
    assert main(argv) == 2 and "needs alpha > 0" in capsys.readouterr().err
    assert not (tmp_path / "z" / "runs").exists()


def test_compare_takes_the_task_from_the_config_file(tmp_path):
    toml = tmp_path / "digits.toml"
    toml.write_text('task = "digits"\nreward = "ink"\nnum_steps = 2\nbatch_size = 2\n'
                    'buffer_size = 4\ncheckpoint_every = 0\ndevice = "cpu"\n')  # fmt: skip
    out = tmp_path / "c"
    argv = ["compare", "--config", str(toml), "--methods", "sqdf", "--seeds", "1", "--steps",
            "1", "--num-samples", "8", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["task"] == "digits" and "diverged" not in doc["runs"][0]
