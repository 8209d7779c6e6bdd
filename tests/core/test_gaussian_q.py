"""The Gaussian posterior soft value (sqdf.core.gaussian_q): second-order Tweedie's covariance
against a mixture's exact posterior covariance, the log-mean-exp against the closed-form soft
value where the posterior is Gaussian, its gradient against finite differences."""

from __future__ import annotations

import pytest
import torch

from sqdf.core.gaussian_q import (
    covariance_root,
    gaussian_soft_value,
    isotropic_soft_value,
    tweedie_covariance,
    tweedie_isotropic_variance,
)
from sqdf.core.gmm import GaussianMixture
from sqdf.core.soft_value import gmm_posterior, soft_value
from sqdf.errors import ConfigError
from sqdf.run.settings import make_config
from sqdf.tasks import build_task

from .test_soft_value import MIX, REWARDS, STATES

GAUSS = GaussianMixture(  # one anisotropic component: its posteriors are Gaussian
    weights=torch.tensor([1.0], dtype=torch.float64),
    means=torch.tensor([[0.5, -0.3]], dtype=torch.float64),
    variances=torch.tensor([[0.4, 0.9]], dtype=torch.float64),
)
ROUND = GaussianMixture(  # one isotropic component: its posteriors are isotropic Gaussians
    weights=torch.tensor([1.0], dtype=torch.float64),
    means=torch.tensor([[0.5, -0.3]], dtype=torch.float64),
    variances=torch.tensor([[0.6, 0.6]], dtype=torch.float64),
)
X = torch.tensor([[0.3, -0.7], [-1.0, 0.4], [1.2, 0.9]], dtype=torch.float64)


def rademacher(n, d, seed, probes=1):
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randint(0, 2, (n, probes, d), generator=g) - 1.0).double()


def posterior_mean_fn(gmm, scale, noise_var):
    def fn(x):
        n = x.shape[0]
        post = gmm_posterior(gmm, x, full(n, scale), full(n, noise_var))
        return (post.log_weights.exp()[..., None] * post.means).sum(1)

    return fn


def full(n, v):
    return torch.full((n,), v, dtype=torch.float64)


@pytest.mark.parametrize("scale, noise_var", STATES)
def test_covariance_is_the_mixtures_posterior_covariance(scale, noise_var):
    n = X.shape[0]
    fn = posterior_mean_fn(MIX, scale, noise_var)
    mean, cov = tweedie_covariance(fn, X, full(n, scale), full(n, noise_var**0.5))
    post = gmm_posterior(MIX, X, full(n, scale), full(n, noise_var))
    w = post.log_weights.exp()  # (B, K)
    second = torch.diag_embed(post.variances) + post.means[..., :, None] * post.means[..., None, :]
    exact = (w[..., None, None] * second).sum(1) - mean[:, :, None] * mean[:, None, :]
    torch.testing.assert_close(cov, exact, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mean, fn(X))


@pytest.mark.parametrize("reward", REWARDS, ids=["linear", "quadratic"])
def test_value_is_the_soft_value_where_the_posterior_is_gaussian(reward):
    alpha, (scale, noise_var), n = 1.5, STATES[1], X.shape[0]
    fn = posterior_mean_fn(GAUSS, scale, noise_var)
    mean, cov = tweedie_covariance(fn, X, full(n, scale), full(n, noise_var**0.5))
    z = torch.randn(n, 400_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = gaussian_soft_value(lambda d: reward(d, None), mean.detach(), cov.detach(), alpha, z)
    post = gmm_posterior(GAUSS, X, full(n, scale), full(n, noise_var))
    exact = soft_value(post, reward.log_mgf(post.means, post.variances, alpha), alpha)
    torch.testing.assert_close(got, exact, rtol=0, atol=5e-3)


def test_value_is_differentiable_in_the_state():
    """Through the posterior's mean and its covariance (a second derivative of the denoiser),
    with the draws z held fixed: autograd against central differences."""
    alpha, (scale, noise_var) = 1.5, STATES[1]
    fn = posterior_mean_fn(MIX, scale, noise_var)
    z = torch.randn(1, 64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def value(x):
        mean, cov = tweedie_covariance(fn, x, full(1, scale), full(1, noise_var**0.5))
        return gaussian_soft_value(lambda d: REWARDS[1](d, None), mean, cov, alpha, z).sum()

    x = X[:1].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(value(x), x)
    h = 1e-6
    for j in range(2):
        e = torch.zeros_like(x)
        e[0, j] = h
        fd = (value(x.detach() + e) - value(x.detach() - e)) / (2 * h)
        assert float(grad[0, j].detach()) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("scale, noise_var", STATES)
def test_isotropic_variance_is_the_mean_posterior_variance_on_average(scale, noise_var):
    """Hutchinson's zᵀJz is unbiased for tr J: over many probes, the mixture's exact mean
    posterior variance tr Cov / D; with a diagonal Jacobian (one axis-aligned component) every
    single probe gives it exactly."""
    fn = posterior_mean_fn(MIX, scale, noise_var)
    n = X.shape[0]
    _, cov = tweedie_covariance(fn, X, full(n, scale), full(n, noise_var**0.5))
    exact = cov.diagonal(dim1=-2, dim2=-1).mean(-1).detach()
    reps = 4000
    x = X.repeat(reps, 1)
    mean, var = tweedie_isotropic_variance(
        fn, x, full(len(x), scale), full(len(x), noise_var**0.5), rademacher(len(x), 2, 0)
    )
    torch.testing.assert_close(mean.detach(), fn(x))
    assert not var.requires_grad
    got = var.view(reps, n).mean(0)
    torch.testing.assert_close(got, exact, rtol=0.03, atol=1e-4)
    diag_fn = posterior_mean_fn(GAUSS, scale, noise_var)
    _, cov = tweedie_covariance(diag_fn, X, full(n, scale), full(n, noise_var**0.5))
    _, var = tweedie_isotropic_variance(
        diag_fn, X, full(n, scale), full(n, noise_var**0.5), rademacher(n, 2, 1)
    )
    torch.testing.assert_close(var, cov.diagonal(dim1=-2, dim2=-1).mean(-1).detach())


def test_several_probes_average_their_readings():
    fn, (scale, noise_var), n = posterior_mean_fn(MIX, *STATES[1]), STATES[1], X.shape[0]
    args = (fn, X, full(n, scale), full(n, noise_var**0.5))
    probes = rademacher(n, 2, 4, probes=5)
    _, var = tweedie_isotropic_variance(*args, probes)
    single = [tweedie_isotropic_variance(*args, probes[:, p : p + 1])[1] for p in range(5)]
    # clamping at 0 comes after the average: compare where no single reading is clamped
    keep = torch.stack(single).min(0).values > 0
    assert bool(keep.any())
    torch.testing.assert_close(var[keep], torch.stack(single).mean(0)[keep])


@pytest.mark.parametrize("reward", REWARDS, ids=["linear", "quadratic"])
def test_isotropic_value_is_the_soft_value_where_the_posterior_is_round(reward):
    alpha, (scale, noise_var), n = 1.5, STATES[1], X.shape[0]
    fn = posterior_mean_fn(ROUND, scale, noise_var)
    mean, var = tweedie_isotropic_variance(
        fn, X, full(n, scale), full(n, noise_var**0.5), rademacher(n, 2, 2)
    )
    z = torch.randn(n, 400_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = isotropic_soft_value(lambda d: reward(d, None), mean.detach(), var, alpha, z)
    post = gmm_posterior(ROUND, X, full(n, scale), full(n, noise_var))
    exact = soft_value(post, reward.log_mgf(post.means, post.variances, alpha), alpha)
    torch.testing.assert_close(got, exact, rtol=0, atol=5e-3)


def test_isotropic_value_is_differentiable_through_the_mean_alone():
    """Its gradient is the value's with the variance held at its probe's reading: autograd
    against central differences of that function; the input keeps no gradient of its own."""
    alpha, (scale, noise_var) = 1.5, STATES[1]
    fn = posterior_mean_fn(MIX, scale, noise_var)
    z = torch.randn(1, 64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    probe = rademacher(1, 2, 3)
    layer = torch.nn.Linear(2, 2, dtype=torch.float64)  # x as a policy's output
    x = X[:1] + layer(X[:1])
    mean, var = tweedie_isotropic_variance(fn, x, full(1, scale), full(1, noise_var**0.5), probe)
    assert all(p.grad is None for p in layer.parameters())  # the probe's product stops at x

    def value(y):
        return isotropic_soft_value(lambda d: REWARDS[1](d, None), fn(y), var, alpha, z).sum()

    (grad,) = torch.autograd.grad(
        isotropic_soft_value(lambda d: REWARDS[1](d, None), mean, var, alpha, z).sum(), x
    )
    h = 1e-6
    for j in range(2):
        e = torch.zeros_like(x)
        e[0, j] = h
        fd = (value(x.detach() + e) - value(x.detach() - e)) / (2 * h)
        assert float(grad[0, j]) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("reward", REWARDS, ids=["linear", "quadratic"])
def test_isotropic_value_keeps_its_variances_gradient_on_request(reward):
    """keep_graph: the gradient is the whole function's, the probe's reading of the trace
    moving with x too (central differences, the probe fixed); it differs from the gradient with
    the reading held, which for a linear reward is exactly Tweedie's."""
    alpha, (scale, noise_var) = 1.5, STATES[1]
    fn = posterior_mean_fn(MIX, scale, noise_var)
    z = torch.randn(1, 64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    probe, args = rademacher(1, 2, 3, probes=2), (full(1, scale), full(1, noise_var**0.5))
    x = X[:1].clone().requires_grad_(True)

    def value(y, keep):
        mean, var = tweedie_isotropic_variance(fn, y, *args, probe, keep_graph=keep)
        return isotropic_soft_value(lambda d: reward(d, None), mean, var, alpha, z).sum()

    (kept,) = torch.autograd.grad(value(x, True), x)
    (held,) = torch.autograd.grad(value(x, False), x)
    h = 1e-5
    for j in range(2):
        e = torch.zeros_like(x)
        e[0, j] = h
        fd = (value(x.detach() + e, False) - value(x.detach() - e, False)).detach() / (2 * h)
        assert float(kept[0, j]) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)
    assert float((kept - held).norm()) > 1e-3
    if reward is REWARDS[0]:
        (tweedie,) = torch.autograd.grad(reward(fn(x), None).sum(), x)
        torch.testing.assert_close(held, tweedie)


def test_a_clamped_variance_has_a_finite_gradient():
    """A negative trace (an inexact denoiser) clamps v at 0: the value is Tweedie's and its
    gradient finite, the trace's gradient kept or not."""
    x = X[:2].clone().requires_grad_(True)
    for keep in (False, True):
        mean, var = tweedie_isotropic_variance(
            lambda y: -y - 0.1 * y**3, x, full(2, 0.6), full(2, 0.8), rademacher(2, 2, 5),
            keep_graph=keep,
        )  # fmt: skip
        assert bool((var == 0).all()) and var.requires_grad == keep
        z = torch.randn(2, 8, 2, dtype=torch.float64)
        (grad,) = torch.autograd.grad(
            isotropic_soft_value(lambda d: REWARDS[1](d, None), mean, var, 1.0, z).sum(), x
        )
        assert bool(torch.isfinite(grad).all())


def test_a_covariance_that_is_not_positive_definite_falls_back_to_its_diagonal():
    cov = torch.tensor([[[1.0, 2.0], [2.0, 1.0]], [[2.0, 0.5], [0.5, 1.0]]], dtype=torch.float64)
    root = covariance_root(cov)
    torch.testing.assert_close(root[0], torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(root[1] @ root[1].T, cov[1], rtol=1e-5, atol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="D <= 64 dimensions, got 65"):
        tweedie_covariance(lambda x: x, torch.zeros(1, 65), torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError, match="alpha must be > 0, got 0"):
        gaussian_soft_value(lambda d: d.sum(1), torch.zeros(1, 2), torch.eye(2)[None], 0.0,
                            torch.zeros(1, 3, 2))  # fmt: skip
    cfg = make_config(dict(task="digits", method="sqdf", estimator="gaussian_posterior",
                           device="cpu"), source="test")  # fmt: skip
    with pytest.raises(ConfigError, match="at most 64; task 'digits' has 256: use q_cov 'iso"):
        build_task(cfg)
    with pytest.raises(ValueError, match=r"probes must have the shape \(1, P, 2\), got \(1, 3\)"):
        tweedie_isotropic_variance(lambda x: x, torch.zeros(1, 2), torch.ones(1), torch.ones(1),
                                   torch.ones(1, 3))  # fmt: skip


def test_gmm2d_soft_q_is_nearer_the_exact_value_than_tweedie():
    """At the VP path's mid noise the posterior is spread over modes: r(E[x0|x]) misses the
    spread's Var[r]/(2α) (linear reward); the Gaussian posterior's log-mean-exp keeps it, up
    to the noise of its 16 draws."""
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(2)) * 1.5
    step, cond = torch.full((256,), 20), torch.zeros(256, dtype=torch.long)
    q = {}
    for est, q_cov in (("tweedie", "full"), ("gaussian_posterior", "full"),
                       ("gaussian_posterior", "isotropic"), ("exact", "full")):  # fmt: skip
        cfg = dict(task="gmm2d", method="sqdf", estimator=est, q_cov=q_cov, gamma=1.0)
        task = build_task(make_config(dict(cfg, device="cpu"), source="test"))
        q[est, q_cov] = task.soft_q(x, step, cond, torch.Generator().manual_seed(3)).detach()
    exact = q["exact", "full"]
    ests = [
        ("tweedie", "full"),
        ("gaussian_posterior", "full"),
        ("gaussian_posterior", "isotropic"),
    ]
    bias = {e: float((q[e] - exact).mean()) for e in ests}
    err = {e: float((q[e] - exact).abs().mean()) for e in ests}
    assert bias[ests[0]] < -0.5, bias
    for e in ests[1:]:
        assert abs(bias[e]) < 0.1 * -bias[ests[0]] and err[e] < err[ests[0]], (bias, err)
    # after the last step the sample is scored as it is
    last = task.soft_q(x, torch.full((256,), 49), cond)
    torch.testing.assert_close(last, task.reward(x, cond))


def test_isotropic_soft_q_on_digits():
    """At 256 dimensions, where the full covariance is refused: finite values, a gradient in
    the state, under no_grad too (the probe's product needs the denoiser's graph), and the
    same value again from the same generator."""
    cfg = make_config(dict(task="digits", method="sqdf", estimator="gaussian_posterior",
                           q_cov="isotropic", q_draws=4, q_probes=2, device="cpu"),
                      source="test")  # fmt: skip
    task = build_task(cfg)
    n = 3
    x = torch.randn(n, *task.sample_shape, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    step, cond = torch.full((n,), 5), task.sample_conditions(n, torch.Generator().manual_seed(1))
    q = task.soft_q(x, step, cond, torch.Generator().manual_seed(2))
    assert q.shape == (n,) and bool(torch.isfinite(q).all())
    (grad,) = torch.autograd.grad(q.sum(), x)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    with torch.no_grad():
        again = task.soft_q(x.detach(), step, cond, torch.Generator().manual_seed(2))
    torch.testing.assert_close(again, q.detach())


def test_the_covariance_takes_up_to_max_dim_dimensions():
    from sqdf.core.gaussian_q import MAX_DIM

    # x0_fn = x / 2: Jacobian I / 2, so Cov = spread^2 / scale * I / 2 (Tweedie's formula)
    one = torch.ones(1, dtype=torch.float64)
    _, cov = tweedie_covariance(lambda x: x / 2, torch.zeros(1, MAX_DIM, dtype=torch.float64),
                                0.5 * one, 0.6 * one)  # fmt: skip
    want = 0.36 / 0.5 / 2 * torch.eye(MAX_DIM, dtype=torch.float64)
    torch.testing.assert_close(cov[0], want)
    with pytest.raises(ValueError, match=f"needs D <= {MAX_DIM} dimensions, got {MAX_DIM + 1}"):
        tweedie_covariance(lambda x: x, torch.zeros(1, MAX_DIM + 1), one, one)


def test_the_covariance_root_of_a_small_covariance_keeps_its_scale():
    # the Cholesky jitter is relative to the mean variance: at variances of 1e-8 the root
    # still reproduces the covariance to 1e-5 of itself
    from sqdf.core.gaussian_q import covariance_root

    cov = 1e-8 * torch.tensor([[[2.0, 0.5], [0.5, 1.0]]], dtype=torch.float64)
    root = covariance_root(cov)
    torch.testing.assert_close(root @ root.transpose(-1, -2), cov, rtol=1e-5, atol=0)
