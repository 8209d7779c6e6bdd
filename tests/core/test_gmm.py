"""Gaussian-mixture math against numerical integration on a grid."""

import math

import pytest
import torch

from sqdf.core.gmm import GaussianMixture, gmm_eps, gmm_posterior_mean, tilt_linear, tilt_quadratic


def mixture() -> GaussianMixture:
    return GaussianMixture(
        weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        means=torch.tensor([[1.5, 0.0], [-1.0, 1.0], [0.0, -1.5]], dtype=torch.float64),
        variances=torch.tensor([[0.2, 0.3], [0.25, 0.25], [0.4, 0.1]], dtype=torch.float64),
    )


def grid(lim=6.0, n=601):
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(g, g, indexing="ij")
    return torch.stack([gx.flatten(), gy.flatten()], 1), (g[1] - g[0]) ** 2


def test_density_integrates_to_one():
    pts, cell = grid()
    assert float(mixture().log_prob(pts).exp().sum() * cell) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("abar", [0.9, 0.3, 0.02])
def test_posterior_mean_and_eps_by_quadrature(abar):
    gmm = mixture()
    pts, _ = grid()
    prior = gmm.log_prob(pts)
    x_t = torch.tensor([[0.4, -0.3], [1.2, 0.9]], dtype=torch.float64)
    # log N(x_t; sqrt(a) x0, (1-a) I) over the grid of x0
    lik = -((x_t[:, None] - abar**0.5 * pts[None]) ** 2).sum(-1) / (2 * (1 - abar))
    w = torch.softmax(prior[None] + lik, dim=1)
    expected = w @ pts
    a = torch.full((2,), abar, dtype=torch.float64)
    torch.testing.assert_close(gmm_posterior_mean(gmm, x_t, a), expected, atol=1e-6, rtol=1e-6)
    eps = (x_t - abar**0.5 * expected) / (1 - abar) ** 0.5
    torch.testing.assert_close(gmm_eps(gmm, x_t, a), eps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "tilt,reward",
    [
        (
            lambda g, a: tilt_linear(g, torch.tensor([0.8, -0.5]), a),
            lambda x: x @ torch.tensor([0.8, -0.5], dtype=x.dtype),
        ),
        (
            lambda g, a: tilt_quadratic(g, torch.tensor([1.0, -0.5]), 1.5, a),
            lambda x: -0.75 * ((x - torch.tensor([1.0, -0.5], dtype=x.dtype)) ** 2).sum(-1),
        ),
    ],
    ids=["linear", "quadratic"],
)
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_tilted_mixture_by_quadrature(tilt, reward, alpha):
    gmm = mixture()
    pts, cell = grid(lim=8.0, n=801)
    unnorm = gmm.log_prob(pts) + reward(pts) / alpha
    numeric = torch.softmax(unnorm, dim=0) / cell  # normalised density on the grid
    exact = tilt(gmm, alpha).log_prob(pts).exp()
    assert float((numeric - exact).abs().sum() * cell) < 1e-5
    # the mode weights: the mass each component carries after tilting
    comp = gmm.component_log_prob(pts) + (reward(pts) / alpha)[:, None]
    weights = torch.softmax(comp.flatten(), 0).view_as(comp).sum(0)
    torch.testing.assert_close(tilt(gmm, alpha).weights, weights, atol=1e-6, rtol=1e-6)


def test_noised_marginal_matches_sampling():
    gmm = mixture()
    g = torch.Generator().manual_seed(0)
    x0 = gmm.sample(200_000, g)
    a = 0.4
    xt = a**0.5 * x0 + (1 - a) ** 0.5 * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    noised = gmm.noised(a)
    mean = (noised.weights[:, None] * noised.means).sum(0)
    torch.testing.assert_close(xt.mean(0), mean, atol=1e-2, rtol=0)
    assert math.isfinite(float(noised.log_prob(xt[:10]).sum()))


def test_responsibilities_are_bayes_rule_over_the_components():
    from torch.distributions import Independent, Normal

    mix = mixture()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    joint = torch.stack([
        w * Independent(Normal(m, v.sqrt()), 1).log_prob(x).exp()
        for w, m, v in zip(mix.weights, mix.means, mix.variances, strict=True)
    ], dim=1)  # fmt: skip
    torch.testing.assert_close(mix.responsibilities(x), joint / joint.sum(1, keepdim=True))
