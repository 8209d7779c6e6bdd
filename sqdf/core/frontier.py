"""The exact reward–KL frontier of a Gaussian-mixture reference under a linear or quadratic
reward: for each regularisation alpha, the KL-regularised optimum p_α ∝ p_ref exp(r/α) has

    E_α[r] = Λ'(λ),    KL(p_α || p_ref) = λ Λ'(λ) - Λ(λ),    λ = 1/α,

where Λ(λ) = log E_ref[exp(λ r)] is the reward's cumulant generating function under the
reference, a log-sum of the components' closed-form log-MGFs (sqdf.core.soft_value).
p_α is the most reward any distribution reaches at its KL from p_ref (the Gibbs variational
principle), and a path KL is never below the KL of its end point, so a sampler whose
reference chain ends exactly at p_ref never lies above the curve in the (path KL, reward)
plane. (A finite-step reference ends near p_ref, not at it: sqdf.experiments.frontier measures
against the curve shifted by that sampler's own reward error.) Along the curve d E_α[r] / d KL = α.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sqdf.core.gmm import GaussianMixture


@dataclass(frozen=True)
class FrontierPoint:
    alpha: float
    kl: float  # KL(p_α || p_ref)
    reward: float  # E_α[r]


def log_partition(reward: Any, reference: GaussianMixture, lam: Tensor) -> Tensor:
    """Λ(λ) = log E_ref[exp(λ r)] for a reward with ``log_mgf`` (linear, quadratic); λ > 0."""
    log_mgf = reward.log_mgf(reference.means, reference.variances, 1.0 / lam)  # (K,)
    return torch.logsumexp(reference.weights.log() + log_mgf, dim=-1)


def frontier_point(reward: Any, reference: GaussianMixture, alpha: float) -> FrontierPoint:
    """The tilted optimum's KL and mean reward at ``alpha`` > 0, exactly (float64 autograd
    for Λ')."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    ref = reference.to(torch.float64)
    lam = torch.tensor(1.0 / alpha, dtype=torch.float64, requires_grad=True)
    value = log_partition(reward, ref, lam)
    (slope,) = torch.autograd.grad(value, lam)
    mean_reward = float(slope)
    # λΛ' - Λ >= 0 in exact arithmetic; rounding near alpha → ∞ can dip below it
    kl = max(float(lam.detach()) * mean_reward - float(value.detach()), 0.0)
    return FrontierPoint(alpha, kl, mean_reward)


def exact_frontier(
    reward: Any,
    reference: GaussianMixture,
    alpha_min: float = 1e-5,
    alpha_max: float = 1e6,
    points: int = 300,
) -> list[FrontierPoint]:
    """The frontier at ``points`` log-spaced alphas from ``alpha_max`` down to ``alpha_min``:
    KL and reward both increase along the list. At the default ``alpha_max`` the first point
    is the reference itself to within 1e-10 in KL."""
    if not 0 < alpha_min < alpha_max or points < 2:
        raise ValueError(
            f"need 0 < alpha_min < alpha_max and points >= 2, got {alpha_min}, {alpha_max}, "
            f"{points}"
        )
    ratio = math.log(alpha_max / alpha_min) / (points - 1)
    alphas = [alpha_max * math.exp(-i * ratio) for i in range(points)]
    return [frontier_point(reward, reference, a) for a in alphas]


def frontier_reward_at(curve: list[FrontierPoint], kl: float) -> float:
    """The most reward reachable at KL ``kl`` (linear between the curve's points); NaN past
    the curve's last point, whose KL bounds what the curve knows."""
    if not math.isfinite(kl):
        return math.nan
    if kl <= curve[0].kl:  # at (near) zero KL: the reference itself
        return curve[0].reward
    for a, b in zip(curve, curve[1:], strict=False):
        if kl <= b.kl:
            w = (kl - a.kl) / (b.kl - a.kl)
            return a.reward + w * (b.reward - a.reward)
    return math.nan


def frontier_kl_at(curve: list[FrontierPoint], reward: float) -> float:
    """The least KL with which any distribution reaches mean reward ``reward``; 0 at or
    below the reference's reward, NaN past the curve's last point."""
    if not math.isfinite(reward):
        return math.nan
    if reward <= curve[0].reward:  # the reference's reward, or less: no KL is needed
        return 0.0
    for a, b in zip(curve, curve[1:], strict=False):
        if reward <= b.reward:
            w = (reward - a.reward) / (b.reward - a.reward)
            return a.kl + w * (b.kl - a.kl)
    return math.nan
