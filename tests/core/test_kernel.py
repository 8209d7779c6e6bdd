"""Step kernels against independent references: diffusers' DDIMScheduler and
FlowMatchEulerDiscreteScheduler step by step, the flow SDE's closed-form Gaussian marginals,
the posterior mean and the Gaussian KL's closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from sqdf.core import gaussian_kl, make_ddim_schedule
from sqdf.core.flow import flow_sigmas, flow_step_mean_std, flow_x0
from sqdf.core.kernel import DDIMKernel, FlowKernel


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_kernel_step_is_diffusers_ddim_step(prediction_type):
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )  # fmt: skip
    sched.set_timesteps(20)
    kernel = DDIMKernel(make_ddim_schedule(20, eta=1.0), prediction_type)
    g = torch.Generator().manual_seed(0)
    for k, t in enumerate(sched.timesteps):
        x, out, z = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
        ks = torch.full((3,), k)
        assert bool((kernel.model_time(ks) == t).all())
        mean, std = kernel.step(out, x, ks)
        expected = sched.step(out, t, x, eta=1.0, variance_noise=z)
        torch.testing.assert_close(mean + std * z, expected.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            kernel.x0(out, x, ks), expected.pred_original_sample, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(std.flatten()[0], kernel.stds[k])


def test_ddim_kernel_noise_is_the_schedulers_add_noise():
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    kernel = DDIMKernel(make_ddim_schedule(10, eta=1.0))
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    k = torch.tensor([0, 3, 7, 9])
    expected = sched.add_noise(x0, eps, kernel.model_time(k))
    torch.testing.assert_close(kernel.noise(x0, eps, k), expected)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 4, 28, 50])
def test_flow_grid_is_the_schedulers_with_its_time_shift(shift, num_steps):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps)
    assert torch.equal(flow_sigmas(num_steps, shift=shift), sched.sigmas)


@pytest.mark.parametrize("mu", [0.5, 1.15])
def test_flow_grid_with_fluxs_dynamic_shift(mu):
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=mu)  # as FluxPipeline calls it
    assert torch.equal(flow_sigmas(28, mu=mu), sched.sigmas)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_noise_level_zero_is_the_euler_step_of_diffusers(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(12)
    sigmas = flow_sigmas(12, shift=shift)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 4, 8, 8, generator=g)
        mean, std = flow_step_mean_std(v, x, sigmas[i], sigmas[i + 1], 0.0, sigmas[1])
        expected = sched.step(v, t, x).prev_sample
        torch.testing.assert_close(mean, expected, rtol=1e-6, atol=1e-6)
        assert float(std) == 0.0
        x = expected


def _gaussian_marginal(m: float, s2: float, t: float) -> tuple[float, float]:
    """Mean and variance of x_t = (1 - t) x0 + t ε for x0 ~ N(m, s2)."""
    return (1 - t) * m, (1 - t) ** 2 * s2 + t**2


def _exact_velocity(m: float, s2: float, t: float):
    """E[ε - x0 | x_t] for x0 ~ N(m, s2): linear in x_t, v = a x + b."""
    mean, var = _gaussian_marginal(m, s2, t)
    cov_eps = t / var  # Cov(ε, x_t) / Var(x_t)
    cov_x0 = (1 - t) * s2 / var
    a = cov_eps - cov_x0
    b = -a * mean - m  # E[ε] - E[x0] = -m at x_t = mean
    return a, b


@pytest.mark.parametrize("noise_level", [0.0, 0.3, 0.7, 1.2])
def test_sde_step_keeps_the_flows_marginals_to_second_order(noise_level):
    # x0 ~ N(m, s2), exact velocity: one step maps N(mu_t, var_t) to a Gaussian whose mean and
    # variance must match the marginal at t_next up to O(dt^2): halving dt quarters the error
    m, s2, t = 1.5, 0.25, 0.6

    def error(dt: float) -> float:
        a, b = _exact_velocity(m, s2, t)
        mu, var = _gaussian_marginal(m, s2, t)
        t_ = torch.tensor(t, dtype=torch.float64)
        # mean and std are affine in x: push the Gaussian through exactly
        x = torch.tensor([0.0, 1.0], dtype=torch.float64)
        mean, std = flow_step_mean_std(a * x + b, x, t_, t_ - dt, noise_level, t_)
        slope, offset = float(mean[1] - mean[0]), float(mean[0])
        new_mu, new_var = slope * mu + offset, slope**2 * var + float(std) ** 2
        want_mu, want_var = _gaussian_marginal(m, s2, t - dt)
        return abs(new_mu - want_mu) + abs(new_var - want_var)

    e1, e2 = error(1e-2), error(5e-3)
    assert e1 < 1e-3
    assert 3.5 < e1 / e2 < 4.5  # the local error is second order: the step is consistent


def test_flow_x0_is_the_posterior_mean_for_the_exact_velocity():
    m, s2, t = -0.7, 0.5, 0.35
    a, b = _exact_velocity(m, s2, t)
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    mu, var = _gaussian_marginal(m, s2, t)
    posterior_mean = m + (1 - t) * s2 / var * (x - mu)
    torch.testing.assert_close(flow_x0(a * x + b, x, torch.tensor(t)), posterior_mean)


def test_kl_between_two_velocities_has_the_closed_form_of_the_method():
    # METHOD.md: mean_theta - mean_ref = (v_theta - v_ref) [1 + sigma^2 (1 - t) / (2t)] dt
    kernel = FlowKernel(flow_sigmas(10, shift=3.0).double(), noise_level=0.7)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    v_p, v_q = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(2))
    for k in range(10):
        ks = torch.full((4,), k)
        mp, std = kernel.step(v_p, x, ks)
        mq, _ = kernel.step(v_q, x, ks)
        t, t_next = kernel.sigmas[k], kernel.sigmas[k + 1]
        sigma = std.flatten()[0] / (t - t_next).sqrt()
        diff = (v_p - v_q) * (1 + sigma**2 * (1 - t) / (2 * t)) * (t_next - t)
        expected = diff.pow(2).sum(1) / (2 * std.flatten()[0] ** 2)
        torch.testing.assert_close(gaussian_kl(mp, mq, std), expected)
        torch.testing.assert_close(std.flatten()[0], kernel.stds[k].double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("noise_level", [0.3, 0.7])
def test_every_steps_std_is_sigma_t_times_the_root_of_the_step(noise_level):
    # sigma_t = a sqrt(t / (1 - t)) below t = 1, written out here independently
    sigmas = flow_sigmas(12, shift=3.0).double()
    kernel = FlowKernel(sigmas, noise_level)
    x, v = torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)
    for k in range(1, 12):
        t, t_next = float(sigmas[k]), float(sigmas[k + 1])
        expected = noise_level * (t / (1 - t)) ** 0.5 * (t - t_next) ** 0.5
        _, std = kernel.step(v, x, torch.tensor([k]))
        assert float(std.flatten()[0]) == pytest.approx(expected, rel=1e-12)
        assert float(kernel.stds[k]) == pytest.approx(expected, rel=1e-6)


def test_a_noise_schedule_runs_linearly_over_the_steps():
    # a_k = a0 + (a1 - a0) k / (T - 1), each step's std sigma_t(a_k) sqrt(t - t_next), written
    # out here; with the end level equal to the start the chain is the one-level one
    sigmas = flow_sigmas(12, shift=3.0).double()
    kernel = FlowKernel(sigmas, 1.4, noise_level_end=0.35)
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for k in range(1, 12):
        a = 1.4 + (0.35 - 1.4) * k / 11
        t, t_next = float(sigmas[k]), float(sigmas[k + 1])
        sigma = a * (t / (1 - t)) ** 0.5
        mean, std = kernel.step(v, x, torch.full((2,), k))
        assert float(std.flatten()[0]) == pytest.approx(sigma * (t - t_next) ** 0.5, rel=1e-12)
        assert float(kernel.stds[k]) == pytest.approx(sigma * (t - t_next) ** 0.5, rel=1e-6)
        drift = v + sigma**2 / (2 * t) * (x + (1 - t) * v)
        torch.testing.assert_close(mean, x + drift * (t_next - t))
    steps = torch.tensor([0, 5, 11])  # a batch at different steps reads each its own level
    _, std = kernel.step(v[:1].expand(3, 3), x[:1].expand(3, 3), steps)
    torch.testing.assert_close(
        std.reshape(3, -1)[:, 0].float(), kernel.stds[steps], rtol=1e-6, atol=0
    )
    flat, one = FlowKernel(sigmas, 0.7, noise_level_end=0.7), FlowKernel(sigmas, 0.7)
    ks = torch.arange(12)
    xs, vs = x[:1].expand(12, 3), v[:1].expand(12, 3)
    for got, want in zip(flat.step(vs, xs, ks), one.step(vs, xs, ks), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="noise_level_end must be > 0"):
        FlowKernel(sigmas, 0.7, noise_level_end=0.0)


def test_first_step_caps_sigma_at_the_grids_next_time():
    sigmas = flow_sigmas(5)
    kernel = FlowKernel(sigmas, noise_level=0.7)
    assert float(sigmas[0]) == 1.0
    assert bool(torch.isfinite(kernel.stds).all()) and bool((kernel.stds > 0).all())
    t1 = float(sigmas[1])
    expected = 0.7 * (1.0 / (1.0 - t1)) ** 0.5 * (1.0 - t1) ** 0.5
    assert float(kernel.stds[0]) == pytest.approx(expected, rel=1e-6)


def test_flow_kernel_noise_and_x0_invert_each_other():
    kernel = FlowKernel(flow_sigmas(8), noise_level=0.5)
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    k = torch.arange(8)
    x = kernel.noise(x0, eps, k)
    torch.testing.assert_close(kernel.x0(eps - x0, x, k), x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "sigmas,noise_level,match",
    [
        (torch.tensor([1.0, 0.5, 0.0]), 0.0, "noise_level must be > 0"),
        (torch.tensor([1.0, 0.5, 0.6, 0.0]), 0.7, "fall strictly"),
        (torch.tensor([1.0, 0.5]), 0.7, "end at 0"),
        (torch.tensor([1.5, 0.5, 0.0]), 0.7, "start in"),
        (torch.tensor([0.0]), 0.7, "grid"),
    ],
)
def test_flow_kernel_refuses_a_bad_grid_or_a_deterministic_step(sigmas, noise_level, match):
    with pytest.raises(ValueError, match=match):
        FlowKernel(sigmas, noise_level)


def test_flow_noised_is_the_schedulers_scale_noise():
    from sqdf.core.flow import flow_noised

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(8)
    g = torch.Generator().manual_seed(6)
    for t, sigma in zip(sched.timesteps, sched.sigmas, strict=False):
        x0, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
        expected = sched.scale_noise(x0, t[None], eps)
        torch.testing.assert_close(flow_noised(x0, eps, sigma), expected)
