"""scripts/gmm_families.py: the random mixtures are what its doc says, the goal is the issue's,
and a tiny run measures every run against its own exact target."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from sqdf.tasks.gmm2d import GMM2DConfig

ROOT = Path(__file__).resolve().parents[1]


def load(name="gmm_families"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_mixtures_keep_their_stated_ranges():
    fam = load()
    sizes = set()
    for seed in range(40):
        m = fam.random_mixture(seed)
        k = len(m["means"])
        sizes.add(k)
        assert 2 <= k <= 8 and len(m["stds"]) == len(m["weights"]) == k
        assert all(math.hypot(*p) <= 3.0 for p in m["means"])
        assert all(math.dist(a, b) >= 1.2 - 1e-3 for i, a in enumerate(m["means"])
                   for b in m["means"][i + 1:])  # fmt: skip
        assert all(0.2 <= s <= 0.6 for s in m["stds"]) and min(m["weights"]) >= 0.05
        GMM2DConfig(**m).mixture()  # a valid gmm2d mixture
    assert len(sizes) >= 5  # the sizes vary
    assert fam.random_mixture(3) == fam.random_mixture(3)


def test_the_goal_and_a_tiny_run(tmp_path, monkeypatch):
    fam = load()
    d = {"target_mode_tv": 0.03, "w2_over_floor": 1.5, "kl_rel_error": -0.1}
    assert fam.meets_goal(d) and not fam.meets_goal({**d, "kl_rel_error": 0.11})
    assert not fam.meets_goal({**d, "target_mode_tv": 0.031})
    argv = ["gmm_families.py", "--out", str(tmp_path), "--families", "1", "--alphas", "2.0",
            "--rewards", "linear", "--sweep", "estimator=tweedie,exact", "--set", "gamma=1.0",
            "--set", "steps=2", "--set", "num_steps=5", "--set", "batch_size=8",
            "--set", "buffer_size=16", "--set", "task_params={hidden = 8}"]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    fam.main()
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [r["value"] for r in rows] == ["tweedie", "exact"]
    run = json.loads((tmp_path / "family0-linear-alpha2" / "results.json").read_text())["runs"][0]
    assert rows[0]["kl_rel_error"] == pytest.approx(run["kl_path"] / run["target_kl"] - 1)
    assert rows[0]["w2_over_floor"] == pytest.approx(
        rows[0]["target_sliced_w2"] / rows[0]["floor_sliced_w2"]
    )
    assert rows[0]["floor_sliced_w2"] == run["ref_sampler_sliced_w2"]
    assert "| tweedie | linear | 2 |" in (tmp_path / "summary.md").read_text()


def test_later_mixtures_by_index(tmp_path, monkeypatch):
    """--first-family 3 --families 2: mixtures 3 and 4 of the same sequence, named by index."""
    fam = load()
    argv = ["gmm_families.py", "--out", str(tmp_path), "--families", "2", "--first-family", "3",
            "--alphas", "2.0", "--rewards", "linear", "--sweep", "estimator=tweedie",
            "--set", "steps=1", "--set", "num_steps=3", "--set", "batch_size=4",
            "--set", "buffer_size=8", "--set", "task_params={hidden = 4}"]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    fam.main()
    written = json.loads((tmp_path / "families.json").read_text())
    assert written == [{"index": i, **fam.mixtures(0, 5)[i]} for i in (3, 4)]
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [r["family"] for r in rows] == [3, 4]
    assert (tmp_path / "family4-linear-alpha2" / "results.json").exists()
    with pytest.raises(SystemExit, match="--first-family must be >= 0"):
        fam.mixtures(-1, 2)


def test_the_gmm2d_guide_command_runs(tmp_path, monkeypatch):
    """The gmm2d guide's command as written, shrunk by flags appended after it (the last
    wins)."""
    import shlex

    from tests.doc_commands import doc_block

    line = doc_block("docs/guides/gmm2d.md", "scripts/gmm_families.py").strip()
    argv = shlex.split(line)[1:]
    assert argv[0] == "scripts/gmm_families.py"
    argv += ["--out", str(tmp_path), "--families", "1", "--alphas", "2.0", "--set", "steps=2",
             "--set", "num_steps=5", "--set", "batch_size=8", "--set", "buffer_size=16",
             "--set", "task_params={hidden = 8}"]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    load().main()
    table = (tmp_path / "summary.md").read_text()
    assert "| tweedie | linear | 2 |" in table and "| exact | quadratic | 2 |" in table


def test_the_w2_bound_against_the_floors_mean(tmp_path, capsys):
    """The floor read several times a mixture; a run's W2 over that mean decides the bound
    where the one-draw ratio did, the other two bounds unchanged."""
    noise = load("w2_floor_noise")
    row = dict(family=0, reward="linear", alpha=1.0, value="8", target_mode_tv=0.02,
               kl_rel_error=-0.05, w2_over_floor=2.0, target_sliced_w2=0.09,
               goal=False)  # fmt: skip
    rows = [row, {**row, "target_mode_tv": 0.05}, {**row, "family": 9},
            {k: v for k, v in row.items() if k != "target_sliced_w2"}]  # fmt: skip
    rows += [{**row, "kl_rel_error": -0.11}, {**row, "target_sliced_w2": 0.11}]  # 1.57x
    got = noise.renormalised(rows, {0: 0.07})
    assert (got["runs"], got["goal_one_draw"], got["goal_mean_floor"]) == (4, 0, 1)
    assert got["skipped"] == 2
    assert got["per_run"][0]["w2_over_mean_floor"] == pytest.approx(0.09 / 0.07, abs=1e-3)
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps(rows))
    argv = ["--out", str(tmp_path / "out"), "--families", "1", "--draws", "2",
            "--num-samples", "64", "--num-steps", "5", "--summary", str(summary)]  # fmt: skip
    assert noise.main(argv) == 0
    doc = json.loads((tmp_path / "out" / "floor_noise.json").read_text())
    (fam,) = doc["families"]
    assert fam["family"] == 0 and fam["floor_mean"] > 0 and fam["floor_std"] >= 0
    assert fam["linear_target_noise_mean"] > 0 and fam["quadratic_target_noise_mean"] > 0
    assert doc["summaries"][str(summary)]["runs"] == 4  # family 9 and a row without raw W2: no
    assert "2 runs skipped" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        noise.main(["--out", str(tmp_path), "--draws", "1"])
    assert "--draws and --num-samples must be >= 2, got 1, 4096" in capsys.readouterr().err
