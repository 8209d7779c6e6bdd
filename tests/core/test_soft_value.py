"""The exact soft value of a Gaussian mixture (sqdf.core.soft_value) against Monte Carlo from
the prior, numerical integration on a grid, and finite differences; and gmm2d's use of it."""

from __future__ import annotations

import math

import pytest
import torch

from sqdf.config.train_config import TrainConfig
from sqdf.core.gmm import GaussianMixture
from sqdf.core.soft_value import gmm_posterior, linear_log_mgf, quadratic_log_mgf, soft_value
from sqdf.errors import ConfigError
from sqdf.rewards.analytic import LinearReward, QuadraticReward
from sqdf.tasks import build_task

# unequal weights and widths, anisotropic
MIX = GaussianMixture(
    weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
    means=torch.tensor([[-2.0, 0.0], [1.5, 1.0], [0.5, -2.5]], dtype=torch.float64),
    variances=torch.tensor([[0.3, 0.5], [0.2, 0.2], [0.6, 0.1]], dtype=torch.float64),
)
REWARDS = [LinearReward(b=(0.8, -0.4)), QuadraticReward(center=(1.0, -1.0), curvature=1.5)]
STATES = [(0.9, 0.19), (0.6, 0.64), (0.2, 0.96)]  # (scale, noise variance): late to early


def value(reward, x, scale, noise_var, alpha):
    n = x.shape[0]
    post = gmm_posterior(MIX, x, torch.full((n,), scale), torch.full((n,), noise_var))
    return soft_value(post, reward.log_mgf(post.means, post.variances, alpha), alpha)


@pytest.mark.parametrize("reward", REWARDS, ids=["linear", "quadratic"])
@pytest.mark.parametrize("scale, noise_var", STATES)
def test_soft_value_matches_monte_carlo_from_the_prior(reward, scale, noise_var):
    """E[exp(r/α) | x] by self-normalised importance weights p(x | x0) on prior draws: no
    posterior formula involved."""
    alpha = 1.5
    x = torch.tensor([[0.3, -0.7], [-1.0, 0.4]], dtype=torch.float64)
    x0 = MIX.sample(400_000, torch.Generator().manual_seed(0))
    for i in range(len(x)):
        log_lik = -0.5 * (x[i] - scale * x0).pow(2).sum(-1) / noise_var
        w = torch.softmax(log_lik, dim=0)
        mc = alpha * math.log(float((w * torch.exp(reward(x0) / alpha)).sum()))
        ours = float(value(reward, x[i : i + 1], scale, noise_var, alpha))
        assert ours == pytest.approx(mc, abs=0.02 * max(1.0, abs(mc)))
        post = gmm_posterior(MIX, x[i : i + 1], torch.tensor([scale]), torch.tensor([noise_var]))
        mean = (post.log_weights.exp()[..., None] * post.means).sum(1)[0]
        torch.testing.assert_close(mean, (w[:, None] * x0).sum(0), atol=0.02, rtol=0)


@pytest.mark.parametrize("reward", REWARDS, ids=["linear", "quadratic"])
def test_soft_value_matches_integration_on_a_grid(reward):
    """α log ∫ p(x0) p(x | x0) e^{r(x0)/α} / ∫ p(x0) p(x | x0), by the trapezoid-free sum
    over a fine 2-D grid (the integrands vanish at its edges)."""
    alpha, scale, noise_var = 0.7, 0.8, 0.36
    x = torch.tensor([[0.5, 0.2]], dtype=torch.float64)
    side = torch.linspace(-9, 9, 1201, dtype=torch.float64)
    grid = torch.cartesian_prod(side, side)
    log_p = MIX.log_prob(grid) - 0.5 * (x - scale * grid).pow(2).sum(-1) / noise_var
    log_num = torch.logsumexp(log_p + reward(grid) / alpha, dim=0)
    exact = alpha * float(log_num - torch.logsumexp(log_p, dim=0))
    assert float(value(reward, x, scale, noise_var, alpha)) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("reward", REWARDS, ids=["linear", "quadratic"])
def test_soft_value_gradient_matches_finite_differences(reward):
    x = torch.tensor([[0.3, -0.7], [1.2, 0.9]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y: value(reward, y, 0.6, 0.64, 1.3), (x,))


def test_log_mgfs_match_one_dimensional_quadrature():
    m, v, alpha = torch.tensor([[0.4, -1.1]]), torch.tensor([[0.7, 0.2]]), 0.9
    b, center, c = torch.tensor([0.5, -2.0]), torch.tensor([1.0, 0.3]), 2.0
    u = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    du = float(u[1] - u[0])
    lin, quad = 0.0, 0.0
    for d in range(2):  # both exponents separate over coordinates
        dens = torch.exp(-0.5 * (u - m[0, d]) ** 2 / v[0, d]) / math.sqrt(2 * math.pi * v[0, d])
        lin += math.log(float((dens * torch.exp(b[d] * u / alpha)).sum()) * du)
        quad += math.log(
            float((dens * torch.exp(-0.5 * c * (u - center[d]) ** 2 / alpha)).sum()) * du
        )
    assert float(linear_log_mgf(m, v, b, alpha)) == pytest.approx(lin, rel=1e-6)
    assert float(quadratic_log_mgf(m, v, center, c, alpha)) == pytest.approx(quad, rel=1e-6)


@pytest.mark.parametrize("process", ["vp", "flow"])
def test_gmm2d_states_hold_the_output_on_the_sampling_path(process):
    """x_state = scale · x_out + sqrt(v) ε, with x_out the reference's output mixture, is the
    path's own marginal at that state (VP: the data noised to ᾱ of the state; flow: the
    interpolation at its t)."""
    task = build_task(TrainConfig(num_steps=8, device="cpu", estimator="tweedie",
                                  task_params={"process": process}))  # fmt: skip
    out = task.reference_output()
    for state in range(task.kernel.num_steps):
        scale, noise_var = (float(v) for v in task.path_of_output(torch.tensor([state])))
        if process == "vp":
            abar = float(task.schedule.abar(task.schedule.timesteps[state : state + 1]))
            want_means, want_vars = (
                math.sqrt(abar) * task.data.means,
                task.data.noised(abar).variances,
            )
        else:
            t = float(task.kernel.sigmas[state])
            want_means = (1 - t) * task.data.means
            want_vars = (1 - t) ** 2 * task.data.variances + t * t
        torch.testing.assert_close(scale * out.means, want_means.double())
        torch.testing.assert_close(scale**2 * out.variances + noise_var, want_vars.double())


@pytest.mark.parametrize(
    "process, reward",
    [("vp", "linear"), ("vp", "quadratic"), ("flow", "linear"), ("flow", "quadratic")],
)
def test_gmm2d_exact_soft_q_is_the_reference_chains_soft_value(process, reward):
    """α log E[exp(r(x_out)/α) | x_state] by running the reference sampler itself from
    x_state (20,000 chains): the closed form is this value at full noise, up to the
    discretisation of 50 Gaussian steps. After the last step soft_q is the reward. (α is not
    1, so that the task's α is seen to reach the formula.)"""
    from sqdf.sampling.sampler import step_mean_std

    params = {"process": process}
    if process == "flow":
        params["noise_level"] = math.sqrt(2.0)
    cfg = TrainConfig(num_steps=50, device="cpu", estimator="exact", reward=reward, alpha=0.7,
                      task_params=params)  # fmt: skip
    task = build_task(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([[1.0, 0.5]])
    cond = torch.zeros(20_000, dtype=torch.long)
    for state in (5, 25):
        q = task.soft_q(x, torch.tensor([state - 1]), cond[:1])  # the step that reached it
        chains = x.expand(20_000, 2).clone()
        with torch.no_grad():
            for k in range(state, 50):
                mean, std = step_mean_std(
                    task, chains, torch.full((20_000,), k), cond, policy=False
                )
                chains = mean + std * torch.randn(chains.shape, generator=g)
        mc = 0.7 * float(torch.logsumexp(task.reward(chains, None) / 0.7, dim=0) - math.log(20_000))
        # 50 steps are not the continuous reversal: a few per cent apart, late states most
        assert float(q) == pytest.approx(mc, abs=0.08 * max(1.0, abs(mc))), state
    last = task.soft_q(x, torch.tensor([49]), cond[:1])
    assert float(last) == pytest.approx(float(task.reward(x, None)))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"eta": 0.5}, "on the VP path that is eta = 1, got 0.5"),
        ({"task_params": {"process": "flow"}}, "that is noise_level = 1.4142135623730951"),
        (
            {"task_params": {"process": "flow", "noise_level": 2**0.5, "noise_level_end": 0.7}},
            r"\(√2\) at every step, got 1.414\d* to 0.7",
        ),
    ],
)
def test_exact_needs_the_sampler_at_full_noise(values, message):
    with pytest.raises(ConfigError, match=message):
        build_task(TrainConfig(device="cpu", estimator="exact", **values))


@pytest.mark.parametrize("reward", REWARDS, ids=["linear", "quadratic"])
def test_soft_value_limits(reward):
    """A noiseless state is the sample: V = r(x). A state that says nothing of x0: V is
    α log E_prior[exp(r/α)], the same for every x (here against prior draws)."""
    x = torch.tensor([[0.3, -0.7], [1.2, 0.9]], dtype=torch.float64)
    torch.testing.assert_close(value(reward, x, 1.0, 1e-12, 0.8), reward(x), rtol=1e-6, atol=1e-6)
    x0 = MIX.sample(400_000, torch.Generator().manual_seed(1))
    mc = 0.8 * math.log(float(torch.exp(reward(x0) / 0.8).mean()))
    uninformed = value(reward, x, 0.0, 1.0, 0.8)
    assert float(uninformed[0]) == pytest.approx(float(uninformed[1]), abs=1e-12)
    assert float(uninformed[0]) == pytest.approx(mc, abs=0.02 * max(1.0, abs(mc)))


def test_exact_is_gmm2d_only():
    with pytest.raises(ConfigError, match="estimator 'exact' needs the closed-form posterior"):
        TrainConfig(task="digits", estimator="exact")


def test_bbo_refuses_the_exact_estimator_before_any_query(tmp_path):
    from sqdf.bbo import BboConfig, run_method

    cfg = TrainConfig(device="cpu", estimator="exact", num_steps=4, steps=1)
    with pytest.raises(ConfigError, match="proxy reward, which has no closed-form soft value"):
        run_method(BboConfig(rounds=1, queries_per_round=2), cfg, "sqdf", 0, tmp_path / "b",
                   progress=False)  # fmt: skip
    assert not (tmp_path / "b" / "rounds.jsonl").exists()
