"""Rectified flow (SD 3/3.5, FLUX) as a Gaussian policy: the time grid, the SDE step with a
known variance, x̂0 and the forward marginal.

Path: x_t = (1 - t) x0 + t ε for t in [0, 1] (t = 1 is noise); the model predicts the velocity
v ≈ E[ε - x0 | x_t]. Because x_t = x0 + t v on the path:

    x̂0 = x_t - t v            the posterior mean E[x0 | x_t] when v is exact
    ε̂  = x_t + (1 - t) v      and the score is ∇log p_t(x_t) = -ε̂ / t

A step from t to t_next = t + Δ (Δ < 0) with noise level a (Flow-GRPO's SDE form, which keeps
the marginals of the deterministic flow):

    σ_t  = a sqrt(t / (1 - t))
    mean = x_t + [v + σ_t² / (2t) (x_t + (1 - t) v)] Δ
    std  = σ_t sqrt(-Δ)

With a = 0 it is the Euler ODE step x_t + v Δ that diffusers' FlowMatchEulerDiscreteScheduler
takes. σ_t is infinite at t = 1, where every schedule starts: there t in the denominator is
replaced by the grid's next time (``t_cap``), as Flow-GRPO does.

Policy and reference share the std, so their per-step KL is ``gaussian_kl`` (the exact KL,
summed, with the 1/2): mean_θ - mean_ref = (v_θ - v_ref) [1 + σ_t² (1 - t) / (2t)] Δ. Flow-GRPO
writes its KL as mean_d (mean_θ - mean_ref)² / (2 σ_t²): over σ_t, the diffusion coefficient,
not the step's std σ_t sqrt(-Δ). Ours is D / |Δ| times theirs, so their β is the per-step
weight β |Δ| / D on ours (``kl.flow_grpo_kl_weights``; ``FlowKernel.step_kl_weights`` with
scale "flow_grpo"), not one scalar.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor


def static_time_shift(sigmas: Any, shift: float) -> Any:
    """SD3's shift: s' = shift s / (1 + (shift - 1) s); shift > 1 spends more steps near noise.
    ``sigmas``: a tensor or a numpy array (the scheduler computes on numpy arrays)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def dynamic_time_shift(sigmas: Any, mu: float) -> Any:
    """FLUX's resolution-dependent shift: s' = e^mu / (e^mu + 1/s - 1)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def flow_sigmas(
    num_steps: int,
    *,
    shift: float = 1.0,
    mu: float | None = None,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """The (num_steps + 1,) time grid from 1 down to 0, float32, as diffusers'
    FlowMatchEulerDiscreteScheduler.set_timesteps builds it: a static ``shift`` (SD3: 3.0), or
    with ``mu`` the dynamic shift of the grid FluxPipeline passes (linspace(1, 1/N, N))."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    # the arithmetic (numpy's linspace, float64 then float32) is the scheduler's, so the grids
    # agree to the last bit
    if mu is None:
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        # the scheduler's own table ends at the shifted 1/num_train_timesteps, in float32
        table_end = torch.tensor([1.0], dtype=torch.float32) / num_train_timesteps
        smallest = float(static_time_shift(table_end, shift)[0])
        grid = np.linspace(num_train_timesteps, smallest * num_train_timesteps, num_steps)
        sigmas = torch.from_numpy(static_time_shift(grid / num_train_timesteps, shift))
    else:
        grid = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
        sigmas = torch.from_numpy(np.asarray(dynamic_time_shift(grid, mu)))
    return torch.cat([sigmas.float(), torch.zeros(1)])


def sde_sigma(t: Tensor, noise_level: float | Tensor, t_cap: Tensor) -> Tensor:
    """σ_t = a sqrt(t / (1 - t)), with t in the denominator capped at ``t_cap`` where t = 1."""
    denominator = 1.0 - torch.where(t >= 1.0, t_cap, t)
    return noise_level * (t / denominator).sqrt()


def flow_step_mean_std(
    velocity: Tensor,
    x_t: Tensor,
    t: Tensor,
    t_next: Tensor,
    noise_level: float | Tensor,
    t_cap: Tensor,
) -> tuple[Tensor, Tensor]:
    """Mean and std of the SDE step from time t to t_next < t.

    # velocity, x_t: (B, ...); t, t_next, t_cap, noise_level: scalars or (B, 1, ...)
    # broadcasting
    """
    dt = t_next - t
    sigma = sde_sigma(t, noise_level, t_cap)
    drift = velocity + sigma**2 / (2 * t) * (x_t + (1 - t) * velocity)
    return x_t + drift * dt, sigma * (-dt).sqrt()


def flow_x0(velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """x̂0 = x_t - t v: the flow's Tweedie estimate (the posterior mean for the exact v)."""
    return x_t - t * velocity


def flow_noised(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """A draw of the path's marginal at time t: (1 - t) x0 + t ε."""
    return (1 - t) * x0 + t * noise
