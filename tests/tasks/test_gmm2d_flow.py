"""gmm2d on the rectified-flow path (``process = "flow"``): the exact velocity against the
mixture's own density, the consistency function against an independent ODE solve, the SDE
sampler converging to the mixture at every noise level, and SQDF landing on the exact
tilted target."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from sqdf.cli import main
from sqdf.config.train_config import TrainConfig
from sqdf.core.gmm import GaussianMixture
from sqdf.evaluators.metrics import sliced_w2
from sqdf.sampling.sampler import sample_trajectories
from sqdf.tasks import build_task


def flow_task(**over) -> object:
    values = {"num_steps": 20, "device": "cpu", "estimator": "tweedie",
              "task_params": {"process": "flow", "hidden": 8, **over.pop("task_params", {})},
              **over}  # fmt: skip
    torch.manual_seed(0)
    return build_task(TrainConfig(**values))


def marginal(gmm: GaussianMixture, t: float) -> GaussianMixture:
    """The law of (1 - t) x0 + t ε for x0 ~ gmm."""
    return GaussianMixture(gmm.weights, (1 - t) * gmm.means, (1 - t) ** 2 * gmm.variances + t**2)


@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 0.98, 0.999])
def test_reference_velocity_is_the_mixtures_own_score(t):
    # independent of the posterior: the noised mixture's score by autograd, against the
    # velocity's ε̂ = x + (1 - t) v = -t * score
    task = flow_task(task_params={"num_modes": 5, "radius": 2.0, "std": 0.4})
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 2, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    gmm = marginal(task.data, t)
    score = torch.autograd.grad(gmm.log_prob(x).sum(), x)[0]
    v = task.model_output(x.detach(), torch.full((64,), t, dtype=torch.float64), None, policy=False)
    eps_hat = x.detach() + (1 - t) * v
    torch.testing.assert_close(eps_hat, -t * score, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("process", ["vp", "flow"])
def test_step_ks_q_is_estimated_at_the_state_it_reaches(process):
    # step k goes from state k to state k + 1: its x̂0 is the posterior mean there, and after
    # the last step the state is the sample itself
    torch.manual_seed(0)
    task = build_task(TrainConfig(num_steps=8, device="cpu", estimator="tweedie",
                                  task_params={"process": process, "hidden": 4}))  # fmt: skip
    x = torch.randn(3, 2, dtype=torch.float64)
    for k in range(8):
        got = task.x0_after_step(x, torch.full((3,), k), None)
        if k == 7:
            assert torch.equal(got, x)
            continue
        state = torch.full((3,), k + 1)
        out = task.model_output(x, task.kernel.model_time(state), None, policy=False)
        torch.testing.assert_close(got, task.kernel.x0(out, x, state))
        other = torch.full((3,), k)
        out_k = task.model_output(x, task.kernel.model_time(other), None, policy=False)
        assert not torch.allclose(got, task.kernel.x0(out_k, x, other))


def test_consistency_x0_is_the_flow_odes_end_point():
    # an independent solve of dx/dt = v(x, t) from t to 0 with many small Euler steps
    task = flow_task(task_params={"ode_steps": 64})
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 2, generator=g, dtype=torch.float64) * 1.5
    t0 = 0.6
    expected, t = x.clone(), t0
    n = 20_000
    for i in range(n):
        t_next = t0 * (1 - (i + 1) / n)
        v = task.model_output(
            expected, torch.full((32,), t, dtype=torch.float64), None, policy=False
        )
        expected = expected + (t_next - t) * v
        t = t_next
    got = task.consistency_x0(x, torch.full((32,), t0, dtype=torch.float64), None)
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-3)


def test_tweedie_x0_is_the_posterior_mean():
    task = flow_task(task_params={"num_modes": 1, "means": [[1.0, -2.0]], "stds": [0.5]})
    x = torch.tensor([[0.3, 0.4], [-1.0, 2.0]], dtype=torch.float64)
    k = torch.tensor([3, 11])
    t = task.kernel.sigmas[k].double()[:, None]
    m, s2 = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.25
    posterior = m + (1 - t) * s2 / ((1 - t) ** 2 * s2 + t**2) * (x - (1 - t) * m)
    torch.testing.assert_close(task.reference_x0(x, k, None), posterior)


@pytest.mark.parametrize("noise_level", [0.3, 0.7, 1.0])
def test_reference_sde_sampler_reaches_the_mixture_as_steps_grow(noise_level):
    n = 4096
    floor_gen = torch.Generator().manual_seed(3)
    distances = {}
    for steps in (4, 16, 64):
        task = flow_task(num_steps=steps, task_params={"noise_level": noise_level})
        x = sample_trajectories(task, n, torch.Generator().manual_seed(4), policy=False).x0
        exact = task.data.sample(n, torch.Generator().manual_seed(5)).float()
        distances[steps] = sliced_w2(x, exact, torch.Generator().manual_seed(6))
    a = task.data.sample(n, floor_gen).float()
    b = task.data.sample(n, floor_gen).float()
    floor = sliced_w2(a, b, torch.Generator().manual_seed(6))
    assert distances[4] > distances[64], distances
    assert distances[64] < 1.5 * floor, (distances, floor)


def test_flow_grid_can_be_shifted_and_bad_settings_are_refused():
    task = flow_task(task_params={"shift": 3.0})
    assert float(task.kernel.sigmas[1]) > 1 - 1 / 20  # shift > 1: more steps near noise
    # a schedule of the noise level: 1.2 at the first of the 20 steps, 0.35 at the last
    levels = flow_task(task_params={"noise_level": 1.2, "noise_level_end": 0.35}).kernel.levels
    assert float(levels[0]) == 1.2 and float(levels[-1]) == 0.35 and len(levels) == 20
    for params, match in (({"process": "ode"}, "process must be one of vp, flow"),
                          ({"noise_level": 0.0}, "noise_level must be > 0"),
                          ({"shift": -1.0}, "shift must be > 0")):  # fmt: skip
        with pytest.raises(Exception, match=match):
            flow_task(task_params=params)


def test_gmm2d_guide_flow_example_lands_closer_to_the_exact_target(tmp_path, monkeypatch):
    from tests.doc_commands import doc_block

    block = doc_block("docs/guides/gmm2d.md", "process=flow --out")
    monkeypatch.chdir(tmp_path)
    for line in block.strip().splitlines():
        argv = shlex.split(line)
        assert argv[0] == "sqdf"
        assert main([*argv[1:], "--no-progress"] if argv[1] == "train" else argv[1:]) == 0
    run = next(p for p in tmp_path.glob("runs/*") if p.is_dir())
    metrics = json.loads((run / "eval.json").read_text())
    # the thresholds of the VP process's guide test
    assert metrics["target_mode_tv"] < metrics["ref_target_mode_tv"]
    assert metrics["target_sliced_w2"] < metrics["ref_target_sliced_w2"]
