"""Gaussian denoising steps: the exact KL between two that share their standard deviation,
and the log-likelihood of a sampled step."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gaussian_kl(mean_p: Tensor, mean_q: Tensor, std: Tensor) -> Tensor:
    """KL( N(mean_p, std² I) || N(mean_q, std² I) ) per sample: ||mean_p - mean_q||² / (2 std²).

    # mean_p, mean_q: (B, ...); std: scalar or broadcasting against them; returns (B,)
    Convention: the exact KL, summed over all dimensions. Other codes write the KL weight
    against a per-dimension mean instead (``alpha_in_sum_convention`` converts).

    A zero std means a deterministic step, where the KL is infinite unless the means agree;
    we refuse it rather than divide by zero.
    """
    std = torch.as_tensor(std, dtype=mean_p.dtype, device=mean_p.device)
    if bool((std <= 0).any()):
        raise ValueError(
            "gaussian_kl needs std > 0 at every step; a deterministic step (eta = 0, or a "
            "final step with alpha-bar = 1) has no finite KL"
        )
    sq = (mean_p - mean_q).pow(2) / (2.0 * std.pow(2))
    return sq.flatten(1).sum(dim=1)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std² I) per sample, summed over dimensions.

    # x, mean: (B, ...); std: scalar or broadcasting; returns (B,)
    """
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).expand_as(x)
    z = (x - mean) / std
    return -(0.5 * z.pow(2) + std.log() + 0.5 * math.log(2 * math.pi)).flatten(1).sum(dim=1)


# How a KL weight alpha may be written, and the factor that turns it into ours (the exact KL,
# summed over the D dimensions of a sample): alpha_sum = alpha * factor / D.
#   sum:       sum  (mean_p - mean_q)^2 / (2 std^2)   the exact KL (ours)
#   mean:      mean (mean_p - mean_q)^2 / std^2       the SQDF reference code (T2I and BBO)
#   half_mean: mean (mean_p - mean_q)^2 / (2 std^2)   the exact KL per dimension
# std is the step's own standard deviation in all three. Flow-GRPO's beta is none of them: it
# divides by the flow SDE's diffusion coefficient, not the step's std, which makes it a
# different weight at each step (``flow_grpo_kl_weights``).
KL_SCALES = {"sum": None, "mean": 2.0, "half_mean": 1.0}


def alpha_in_sum_convention(alpha: float, scale: str, dims: int) -> float:
    """The KL weight ``alpha`` written in convention ``scale`` (a key of KL_SCALES), as the
    weight of the exact summed KL of a sample with ``dims`` dimensions: the same loss."""
    if scale not in KL_SCALES:
        raise ValueError(f"unknown KL scale {scale!r}; known: {', '.join(KL_SCALES)}")
    if dims < 1:
        raise ValueError(f"a sample needs at least one dimension, got {dims}")
    factor = KL_SCALES[scale]
    return alpha if factor is None else alpha * factor / dims


def flow_grpo_kl_weights(beta: float, step_sizes: Tensor, dims: int) -> Tensor:
    """Flow-GRPO's KL weight ``beta`` as the weight of our exact summed KL at each step.

    # step_sizes: (T,) |Δ_k| = t_k - t_{k+1} of the flow grid; returns (T,) float64
    Flow-GRPO's KL is mean_d (μ_θ - μ_ref)² / (2 σ_t²) with σ_t the SDE's diffusion
    coefficient; the step's std is σ_t sqrt(|Δ_k|), so our summed KL is D / |Δ_k| times theirs
    and β · KL_theirs = (β |Δ_k| / D) · KL_ours. No single scalar does this on a non-uniform
    grid: the weight falls with the step size.
    """
    if dims < 1:
        raise ValueError(f"a sample needs at least one dimension, got {dims}")
    if bool((step_sizes <= 0).any()):
        raise ValueError("flow_grpo_kl_weights needs every step size |Δ_k| > 0")
    return beta * step_sizes.double() / dims
