"""Flow-GRPO's KL weight beta against our exact KL: an independent implementation of their SDE
step and KL, written here in numpy from their formulas (yifan123/flow_grpo at ac4c86e,
flow_grpo/diffusers_patch/sd3_sde_with_logprob.py lines 42-50, scripts/train_sd3.py line 895),
on random grids and inputs and on SD 3.5's 10-step shift-3 grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sqdf.core import gaussian_kl, make_ddim_schedule
from sqdf.core.flow import flow_sigmas
from sqdf.core.kernel import DDIMKernel, FlowKernel


def their_step(velocity, sample, sigmas, k, noise_level):
    """sde_step_with_logprob's mean and std_dev_t at step k of the grid ``sigmas``."""
    sigma, sigma_prev, sigma_max = sigmas[k], sigmas[k + 1], sigmas[1]
    dt = sigma_prev - sigma
    std_dev_t = np.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * noise_level
    mean = (
        sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
        + velocity * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    return mean, std_dev_t


def their_kl(mean, mean_ref, std_dev_t):
    """train_sd3.py's kl_loss before the batch mean: per sample, the mean over dimensions."""
    return ((mean - mean_ref) ** 2).reshape(mean.shape[0], -1).mean(axis=1) / (2 * std_dev_t**2)


def _random_grid(rng, steps):
    inner = np.sort(rng.uniform(0.01, 0.99, steps - 1))[::-1]
    return np.concatenate([[1.0], inner, [0.0]])


SD35_GRID = flow_sigmas(10, shift=3.0).double().numpy()  # SD 3.5's scheduler config: shift 3


@pytest.mark.parametrize("grid", ["sd35", "random"])
def test_flow_grpo_beta_is_our_exact_kl_weighted_by_step_size_over_d(grid):
    rng = np.random.default_rng(0)
    sigmas = SD35_GRID if grid == "sd35" else _random_grid(rng, 7)
    kernel = FlowKernel(torch.from_numpy(sigmas), noise_level=0.7)
    shape = (3, 4, 5, 6)  # B and a latent's (C, H, W)
    dims, beta = int(np.prod(shape[1:])), 0.01
    weights = kernel.step_kl_weights(beta, "flow_grpo", dims)
    for k in range(kernel.num_steps):
        x, v, v_ref = (rng.standard_normal(shape) for _ in range(3))
        mean, std_dev_t = their_step(v, x, sigmas, k, 0.7)
        mean_ref, _ = their_step(v_ref, x, sigmas, k, 0.7)
        theirs = beta * their_kl(mean, mean_ref, std_dev_t)
        ks = torch.full((shape[0],), k)
        ours_mean, std = kernel.step(torch.from_numpy(v), torch.from_numpy(x), ks)
        ours_ref, _ = kernel.step(torch.from_numpy(v_ref), torch.from_numpy(x), ks)
        np.testing.assert_allclose(ours_mean.numpy(), mean, rtol=1e-10, atol=1e-12)
        ours = weights[k] * gaussian_kl(ours_mean, ours_ref, std)
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-9)


def test_no_single_weight_reproduces_flow_grpo_on_the_sd35_grid():
    kernel = FlowKernel(torch.from_numpy(SD35_GRID), noise_level=0.7)
    weights = kernel.step_kl_weights(0.01, "flow_grpo", 16 * 64 * 64).numpy()
    step_sizes = SD35_GRID[:-1] - SD35_GRID[1:]
    np.testing.assert_allclose(weights, 0.01 * step_sizes / (16 * 64 * 64), rtol=1e-12)
    # the last step is the longest (0.00893 to 0): a per-dimension scalar beta / D weights the
    # KL there 1 / |Δ| ≈ 112 times more than Flow-GRPO, and the first step ≈ 25 times
    ratio = (0.01 / (16 * 64 * 64)) / weights
    assert ratio[0] == pytest.approx(1 / (1.0 - SD35_GRID[1]))
    assert ratio[-1] == pytest.approx(1 / SD35_GRID[-2])
    assert ratio.max() / ratio.min() > 20


@pytest.mark.parametrize("scale", ["sum", "mean", "half_mean"])
def test_scalar_conventions_weight_every_step_alike(scale):
    kernel = FlowKernel(torch.from_numpy(SD35_GRID), noise_level=0.7)
    weights = kernel.step_kl_weights(0.5, scale, 8)
    expected = {"sum": 0.5, "mean": 0.5 * 2 / 8, "half_mean": 0.5 / 8}[scale]
    assert torch.equal(weights, torch.full((10,), expected, dtype=torch.float64))


def test_half_mean_is_the_exact_kl_per_dimension_on_a_flow_step():
    # half_mean's docstring: mean over dimensions of (μ_p - μ_q)² / (2 std²), std the step's
    rng = np.random.default_rng(1)
    kernel = FlowKernel(torch.from_numpy(SD35_GRID), noise_level=0.7)
    x, v, v_ref = (torch.from_numpy(rng.standard_normal((2, 3, 4))) for _ in range(3))
    k = torch.tensor([9, 9])
    mean, std = kernel.step(v, x, k)
    ref, _ = kernel.step(v_ref, x, k)
    per_dim = ((mean - ref) ** 2 / (2 * std**2)).flatten(1).mean(dim=1)
    w = kernel.step_kl_weights(0.3, "half_mean", 12)[9]
    torch.testing.assert_close(w * gaussian_kl(mean, ref, std), 0.3 * per_dim)


def test_flow_grpo_scale_is_refused_on_a_ddim_kernel():
    kernel = DDIMKernel(make_ddim_schedule(10, eta=1.0))
    with pytest.raises(ValueError, match="^KL scale 'flow_grpo' is Flow-GRPO's beta.*DDIMKernel"):
        kernel.step_kl_weights(0.01, "flow_grpo", 16)


def test_flow_grpo_kl_weights_refuse_a_step_that_does_not_fall_and_no_dimension():
    from sqdf.core.kl import flow_grpo_kl_weights

    steps = torch.tensor([0.5, 0.25, 0.25])
    torch.testing.assert_close(flow_grpo_kl_weights(0.1, steps, 2), 0.1 * steps.double() / 2)
    for bad in (torch.tensor([0.5, 0.0, 0.5]), torch.tensor([0.5, -0.1, 0.6])):
        with pytest.raises(ValueError, match=r"needs every step size \|Δ_k\| > 0"):
            flow_grpo_kl_weights(0.1, bad, 2)
    with pytest.raises(ValueError, match="a sample needs at least one dimension, got 0"):
        flow_grpo_kl_weights(0.1, steps, 0)
