"""The Gaussian-step floor on gmm2d (sqdf.gaussian_floor) and its script over random mixtures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqdf.errors import SqdfError
from sqdf.gaussian_floor import measure_gaussian_floor, sample_gaussian_floor
from sqdf.settings import make_config
from sqdf.tasks import build_task

ROOT = Path(__file__).resolve().parents[1]


def task_of(reward="linear", process="vp", **params):
    # the exact value is the flow sampler's at its full noise level, √2
    extra = {"process": process, "noise_level": 2**0.5} if process != "vp" else {}
    return build_task(make_config({
        "task": "gmm2d", "reward": reward, "alpha": 1.0, "gamma": 1.0, "estimator": "exact",
        "num_steps": 10, "task_params": {**params, **extra},
    }, source="test"))  # fmt: skip


def test_on_one_gaussian_with_a_linear_reward_every_projection_is_the_same_step():
    # a Gaussian prior makes the exact soft value linear in the state: its tilted steps are
    # Gaussians of the reference's variance, so the three projections take one step
    task = task_of(means=[[0.5, -0.3]], stds=[0.4], weights=[1.0])
    draws = {
        p: sample_gaussian_floor(task, 256, torch.Generator().manual_seed(0), projection=p)
        for p in ("sqdf", "first_order", "moment")
    }
    x, kl, change = draws["sqdf"]
    assert change < 1e-12 and bool((kl > 0).all())
    for other in ("first_order", "moment"):
        torch.testing.assert_close(draws[other][0], x, rtol=0, atol=1e-9)
        torch.testing.assert_close(draws[other][1], kl, rtol=0, atol=1e-9)


@pytest.mark.parametrize("process", ["vp", "flow"])
def test_the_floor_is_measured_as_a_run_is(process):
    task = task_of("quadratic", process)
    run = measure_gaussian_floor(task, 512, 0, projection="sqdf", iters=2)
    for key in ("reward_mean", "kl_path", "target_mode_tv", "target_sliced_w2",
                "ref_sampler_sliced_w2", "target_kl", "target_reward_mean"):  # fmt: skip
        assert isinstance(run[key], float), key
    assert run["kl_path"] > 0 and run["fixed_point_change"] >= 0
    ref = measure_gaussian_floor(task, 512, 0, projection="first_order")
    assert ref["reward_mean"] != run["reward_mean"]  # the fixed point is another step


def test_a_task_without_the_exact_value_or_a_bad_projection_is_refused():
    with pytest.raises(SqdfError, match="projection must be one of sqdf, first_order, moment"):
        sample_gaussian_floor(task_of(), 4, torch.Generator(), projection="mode")
    with pytest.raises(SqdfError, match="needs the exact soft value"):
        sample_gaussian_floor(object(), 4, torch.Generator())


def test_the_script_writes_the_goal_table(tmp_path):
    argv = [sys.executable, str(ROOT / "scripts" / "gaussian_floor.py"), "--out", str(tmp_path),
            "--families", "1", "--rewards", "linear", "--projections", "first_order,sqdf",
            "--num-steps", "8", "--samples", "256", "--iters", "1", "--alphas", "1,2"]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["value"], r["alpha"]) for r in rows] == [
        ("first_order, 8", 1.0), ("first_order, 8", 2.0), ("sqdf, 8", 1.0), ("sqdf, 8", 2.0)
    ]  # fmt: skip
    assert rows[0]["kl_path"] > rows[1]["kl_path"]  # a lighter tilt moves less
    table = (tmp_path / "summary.md").read_text()
    assert table.startswith("| Gaussian step, sampling steps | reward |")
    for value in ("first_order, 8", "sqdf, 8"):
        assert f"| {value} | linear | 1 |" in table and f"| {value} | linear | 2 |" in table


def test_the_readme_command_runs(tmp_path):
    """The README's command as written, shrunk by flags appended after it (the last wins)."""
    import re
    import shlex

    readme = (ROOT / "README.md").read_text()
    (line,) = [b.strip() for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
               if "scripts/gaussian_floor.py" in b]  # fmt: skip
    argv = shlex.split(line)
    assert argv[:2] == [".venv/bin/python", "scripts/gaussian_floor.py"]
    argv = [sys.executable, *argv[1:], "--out", str(tmp_path), "--families", "1",
            "--num-steps", "6", "--samples", "128", "--iters", "1"]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
    table = (tmp_path / "summary.md").read_text()
    for projection in ("sqdf", "first_order", "moment"):
        assert f"| {projection}, 6 | quadratic | 1 |" in table
