"""The Gaussian-step floor on gmm2d (sqdf.evaluation.gaussian_floor) and its script over random
mixtures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqdf.errors import SqdfError
from sqdf.evaluation.gaussian_floor import measure_gaussian_floor, sample_gaussian_floor
from sqdf.run.settings import make_config
from sqdf.tasks import build_task

ROOT = Path(__file__).resolve().parents[1]


def task_of(reward="linear", process="vp", alpha=1.0, **params):
    # the exact value is the flow sampler's at its full noise level, √2
    extra = {"process": process, "noise_level": 2**0.5} if process != "vp" else {}
    return build_task(make_config({
        "task": "gmm2d", "reward": reward, "alpha": alpha, "gamma": 1.0, "estimator": "exact",
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


def maximise_the_step_objective(mu, sd, value, alpha, start, points=5):
    """argmax over m of J(m) = E_{y ~ N(m, sd² I)}[V(y)] - α |m - μ|² / (2 sd²) for each row,
    by L-BFGS on J itself, E by the tensor-product Gauss–Hermite rule of numpy's nodes.

    # mu, start: (B, D); sd: (B,); value: (N, D) -> (N,); returns (B, D)
    """
    import numpy as np

    z, w = np.polynomial.hermite_e.hermegauss(points)  # weight exp(-z²/2)
    nodes = torch.tensor([[a, b] for a in z for b in z], dtype=torch.float64)
    weights = torch.tensor(np.outer(w, w).reshape(-1) / (2 * np.pi), dtype=torch.float64)
    m = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([m], max_iter=500, tolerance_grad=1e-13, tolerance_change=0,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def minus_j():
        opt.zero_grad()
        y = m[:, None, :] + sd[:, None, None] * nodes[None]
        expected = (value(y.reshape(-1, 2)).reshape(len(m), -1) * weights).sum(1)
        loss = -(expected - alpha * ((m - mu) ** 2).sum(1) / (2 * sd**2)).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(minus_j)
    return m.detach()


# tilts light enough that the fixed point converges (σ² |∇²V| < α at every step)
@pytest.mark.parametrize("process, reward", [("vp", "quadratic"), ("flow", "linear")])
def test_the_floor_is_measured_as_a_run_is(process, reward):
    """The floor's chain drawn again from the same noise, each step's mean the maximiser of
    SQDF's per-step objective J found by L-BFGS on J (not by the fixed point of its
    gradient), its path KL |m - μ|² / (2σ²) per step; then measured as sqdf eval measures a
    gmm2d run (the reward's mean, the task's evaluate against the reference's samples)."""
    from sqdf.sampling.sampler import sample_trajectories, step_mean_std

    task = task_of(reward, process, alpha=4.0)
    n = 256
    run = measure_gaussian_floor(task, n, 0, projection="sqdf", iters=40)
    assert run["fixed_point_change"] < 1e-10  # converged: the fixed point is J's optimum

    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, 2), generator=g, dtype=torch.float64)
    cond = torch.zeros(n, dtype=torch.long)
    kl = torch.zeros(n, dtype=torch.float64)
    steps = task.kernel.num_steps
    for k in range(steps):
        mu, std = step_mean_std(task, x, torch.full((n,), k), cond, policy=False)
        sd = std.reshape(-1).expand(n).to(x)
        if k == steps - 1:
            value = lambda y: task.reward(y, None)  # noqa: E731
        else:
            value = lambda y, k=k: task.exact_soft_value(y, torch.full((len(y),), k + 1))  # noqa: E731
        with torch.enable_grad():  # the first-order step, J's maximiser's neighbour, as start
            y = mu.detach().clone().requires_grad_(True)
            start = mu + sd[:, None] ** 2 / task.alpha * torch.autograd.grad(value(y).sum(), y)[0]
        m = maximise_the_step_objective(mu, sd, value, task.alpha, start.detach())
        kl += ((m - mu) ** 2).sum(1) / (2 * sd**2)
        x = m + sd[:, None] * torch.randn(x.shape, generator=g, dtype=x.dtype)
    samples = x.float()
    ref = sample_trajectories(task, n, g, policy=False).states[:, -1]
    want = {
        "reward_mean": float(task.reward(samples, None).mean()),
        "kl_path": float(kl.mean()),
        **task.evaluate(samples, ref, cond, g),
    }
    assert want["kl_path"] > 0 and want.keys() <= run.keys()
    for key, expected in want.items():
        assert run[key] == pytest.approx(expected, rel=1e-5, abs=1e-7), key
    first_order = measure_gaussian_floor(task, n, 0, projection="first_order")
    assert first_order["kl_path"] != pytest.approx(run["kl_path"], rel=1e-3)  # another step


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


def test_the_gmm2d_guide_command_runs(tmp_path):
    """The gmm2d guide's command as written, shrunk by flags appended after it (the last
    wins)."""
    import shlex

    from tests.doc_commands import doc_block

    line = doc_block("docs/guides/gmm2d.md", "scripts/gaussian_floor.py").strip()
    argv = shlex.split(line)
    assert argv[:2] == [".venv/bin/python", "scripts/gaussian_floor.py"]
    argv = [sys.executable, *argv[1:], "--out", str(tmp_path), "--families", "1",
            "--num-steps", "6", "--samples", "128", "--iters", "1"]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
    table = (tmp_path / "summary.md").read_text()
    for projection in ("sqdf", "first_order", "moment"):
        assert f"| {projection}, 6 | quadratic | 1 |" in table


def test_the_script_takes_the_flow_path_by_task_param():
    """--task-param reaches the task: the script's rows on the flow path are the floor measured
    on the flow task built directly (and not the VP path's)."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("floor", ROOT / "scripts" / "gaussian_floor.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    mixture = {"means": [[1.0, 0.0], [-1.0, 0.5]], "stds": [0.3, 0.4], "weights": [1.0, 2.0]}
    args = argparse.Namespace(seeds=1, samples=256, iters=0, points=3, task_param=[
        "process=flow", "noise_level=1.4142135623730951"])  # fmt: skip
    row = script.floor_rows(args, mixture, 0, "linear", 1.0, 10, "first_order")[0]
    direct = measure_gaussian_floor(task_of(process="flow", **mixture), 256, 0,
                                    projection="first_order", iters=0, points=3)  # fmt: skip
    assert row["kl_path"] == pytest.approx(direct["kl_path"], rel=1e-9)
    vp = script.floor_rows(argparse.Namespace(**{**vars(args), "task_param": []}), mixture, 0,
                           "linear", 1.0, 10, "first_order")[0]  # fmt: skip
    assert vp["kl_path"] != pytest.approx(row["kl_path"], rel=1e-3)
