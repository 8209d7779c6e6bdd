"""The best fixed-variance Gaussian step under a soft value: its fixed point against closed
forms (linear and quadratic values), the stationarity of SQDF's per-step objective there,
and the tilted step's mean against direct integration."""

from __future__ import annotations

import math

import pytest
import torch

from sqdf.core.gaussian_step import best_gaussian_mean, gauss_hermite_nodes, tilted_mean


def test_the_quadrature_has_the_standard_normals_moments():
    nodes, w = gauss_hermite_nodes(5, 2)
    assert nodes.shape == (25, 2) and math.isclose(float(w.sum()), 1.0, rel_tol=1e-12)
    mean = (w[:, None] * nodes).sum(0)
    cov = (w[:, None, None] * nodes[:, :, None] * nodes[:, None, :]).sum(0)
    torch.testing.assert_close(mean, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(cov, torch.eye(2, dtype=torch.float64), atol=1e-12, rtol=0)
    assert math.isclose(float((w * nodes[:, 0] ** 4).sum()), 3.0, rel_tol=1e-12)
    with pytest.raises(ValueError, match="at most 3"):
        gauss_hermite_nodes(3, 4)
    nodes, w = gauss_hermite_nodes(3, 3)  # three dimensions, the most, are allowed
    assert nodes.shape == (27, 3) and math.isclose(float(w.sum()), 1.0, rel_tol=1e-12)


def quadratic(c, a):
    """V(y) = -(c/2) |y - a|² and its gradient."""
    return (lambda y: -0.5 * c * ((y - a) ** 2).sum(1)), (lambda y: -c * (y - a))


@pytest.mark.parametrize("iters", [0, 3])
def test_a_linear_value_shifts_the_mean_by_sigma_squared_over_alpha(iters):
    mu = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    std = torch.linspace(0.1, 0.6, 6, dtype=torch.float64)
    b = torch.tensor([0.7, -1.3], dtype=torch.float64)
    m, change = best_gaussian_mean(mu, std, lambda y: b.expand(len(y), 2), 2.0, iters=iters)
    torch.testing.assert_close(m, mu + std[:, None] ** 2 / 2.0 * b)
    assert math.isnan(change) if iters == 0 else change < 1e-12  # no iteration: no change
    # a std shared by every sample may be a float (it passes through float32 on its way)
    one, _ = best_gaussian_mean(mu, 0.3, lambda y: b.expand(len(y), 2), 2.0, iters=iters)
    torch.testing.assert_close(one, mu + 0.3**2 / 2.0 * b, rtol=1e-6, atol=1e-7)
    # the tilted step of a linear value is that Gaussian itself
    value = lambda y: y @ b  # noqa: E731
    torch.testing.assert_close(tilted_mean(mu, std, value, 2.0), m)


def test_a_quadratic_values_fixed_point_is_the_tilted_gaussians_mean():
    mu = torch.tensor([[0.3, -0.2], [2.0, 1.0]], dtype=torch.float64)
    std, alpha, c = torch.tensor([0.5, 0.3], dtype=torch.float64), 0.5, 1.5
    a = torch.tensor([1.0, 1.0], dtype=torch.float64)
    value, grad = quadratic(c, a)
    k = (std**2 * c / alpha)[:, None]
    want = (mu + k * a) / (1 + k)  # N(μ, σ²) exp(V/α): precision 1/σ² + c/α
    m, change = best_gaussian_mean(mu, std, grad, alpha, iters=60)
    torch.testing.assert_close(m, want)
    assert change < 1e-6  # a contraction by σ²c/α = 0.75 an iteration
    first, _ = best_gaussian_mean(mu, std, grad, alpha, iters=0)
    assert float((first - want).abs().max()) > 0.05  # the first-order step is another
    torch.testing.assert_close(
        tilted_mean(mu, std, value, alpha, points=15), want, atol=1e-6, rtol=0
    )


def test_the_fixed_point_makes_sqdfs_per_step_objective_stationary():
    # a two-bump value: the step's objective J(m) = E_N(m, σ²)[V] - α |m - μ|² / (2σ²)
    centres = torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=torch.float64)

    def value(y):
        return torch.logsumexp(-((y[:, None, :] - centres[None]) ** 2).sum(-1), dim=1)

    def grad(y):
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            return torch.autograd.grad(value(y).sum(), y)[0]

    mu = torch.tensor([[0.2, 0.1], [-0.4, 0.9]], dtype=torch.float64)
    std, alpha = torch.tensor([0.3, 0.2], dtype=torch.float64), 1.0
    m, _ = best_gaussian_mean(mu, std, grad, alpha, iters=30, points=7)
    nodes, w = gauss_hermite_nodes(7, 2)

    def objective(m):
        y = m[:, None, :] + std[:, None, None] * nodes[None]
        expected = (w * value(y.reshape(-1, 2)).reshape(2, -1)).sum(1)
        return expected - alpha * ((m - mu) ** 2).sum(1) / (2 * std**2)

    m = m.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(objective(m).sum(), m)
    assert float(g.abs().max()) < 1e-8
    first, _ = best_gaussian_mean(mu, std, grad, alpha, iters=0)
    assert bool((objective(first) < objective(m.detach())).all())


def test_the_tilted_mean_is_the_integrals():
    # one dimension, on a fine grid: E[y] under N(μ, σ²) exp(V/α) with a bumpy V
    mu, std, alpha = torch.tensor([[0.4]], dtype=torch.float64), 0.35, 0.7
    value = lambda y: torch.sin(3 * y[:, 0]) + 0.5 * y[:, 0]  # noqa: E731
    grid = torch.linspace(-4, 4, 200_001, dtype=torch.float64)[:, None]
    log_p = -((grid - mu) ** 2)[:, 0] / (2 * std**2) + value(grid) / alpha
    want = float((torch.softmax(log_p, 0) * grid[:, 0]).sum())
    got = float(tilted_mean(mu, torch.tensor([std], dtype=torch.float64), value, alpha,
                            points=25))  # fmt: skip
    assert math.isclose(got, want, abs_tol=1e-6)
