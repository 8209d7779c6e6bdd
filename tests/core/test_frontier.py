"""The exact reward–KL frontier (sqdf.core.frontier) against the tilted mixtures themselves
(Monte Carlo of their reward and of KL with exact densities), its slope identity, and the
Gibbs bound it states: no other distribution lies above it."""

from __future__ import annotations

import math

import pytest
import torch

from sqdf.core.frontier import (
    exact_frontier,
    frontier_kl_at,
    frontier_point,
    frontier_reward_at,
)
from sqdf.core.gmm import GaussianMixture
from tests.core.test_soft_value import MIX, REWARDS


def tilted_moments(reward, alpha: float, n: int = 200_000) -> tuple[float, float]:
    """(KL(p_α || p_ref), E_α[r]) from samples of the tilted mixture and exact densities."""
    target = reward.tilt(MIX, alpha)
    x = target.sample(n, torch.Generator().manual_seed(0))
    return float((target.log_prob(x) - MIX.log_prob(x)).mean()), float(reward(x).mean())


@pytest.mark.parametrize("reward", REWARDS, ids=["linear", "quadratic"])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 4.0])
def test_frontier_points_are_the_tilted_mixtures(reward, alpha):
    point = frontier_point(reward, MIX, alpha)
    kl, mean_reward = tilted_moments(reward, alpha)
    assert point.kl == pytest.approx(kl, rel=0.01, abs=2e-3)
    assert point.reward == pytest.approx(mean_reward, rel=0.01, abs=5e-3)


@pytest.mark.parametrize("reward", REWARDS, ids=["linear", "quadratic"])
def test_frontier_slope_is_alpha(reward):
    """dE_α[r]/dKL = α along the curve (the tilt is the Lagrangian optimum)."""
    for alpha in (0.7, 2.0):
        lo, hi = (
            frontier_point(reward, MIX, alpha * 1.001),
            frontier_point(reward, MIX, alpha / 1.001),
        )
        assert (hi.reward - lo.reward) / (hi.kl - lo.kl) == pytest.approx(alpha, rel=1e-3)


@pytest.mark.parametrize("reward", REWARDS, ids=["linear", "quadratic"])
def test_no_reweighted_mixture_lies_above_the_frontier(reward):
    """Gibbs: any distribution q has E_q[r] <= the frontier's reward at KL(q || p_ref). Tried on
    the reference's components re-weighted and moved (a family the tilt is not in)."""
    curve = exact_frontier(reward, MIX)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        w = torch.rand(3, generator=gen, dtype=torch.float64) + 0.1
        shift = 0.5 * torch.randn(3, 2, generator=gen, dtype=torch.float64)
        q = GaussianMixture(w / w.sum(), MIX.means + shift, MIX.variances)
        x = q.sample(100_000, gen)
        kl = float((q.log_prob(x) - MIX.log_prob(x)).mean())
        assert float(reward(x).mean()) <= frontier_reward_at(curve, kl) + 0.01


def test_frontier_runs_from_the_reference_upwards():
    reward = REWARDS[0]
    curve = exact_frontier(reward, MIX, points=50)
    ref_reward = float((MIX.weights[:, None] * MIX.means).sum(0) @ torch.tensor(reward.b).double())
    assert curve[0].kl < 1e-9 and curve[0].reward == pytest.approx(ref_reward, abs=1e-5)
    kls, rewards = [p.kl for p in curve], [p.reward for p in curve]
    assert kls == sorted(kls) and rewards == sorted(rewards)


def test_interpolation_inverts_and_stops_at_the_curves_end():
    curve = exact_frontier(REWARDS[1], MIX, points=80)
    for kl in (0.05, 0.4, 1.5):
        assert frontier_kl_at(curve, frontier_reward_at(curve, kl)) == pytest.approx(kl, rel=1e-6)
    assert frontier_kl_at(curve, curve[0].reward - 1.0) == 0.0  # below the reference's reward
    assert frontier_kl_at(curve, curve[0].reward) == 0.0  # at it (curve[0].kl is about 1e-11)
    mid = (curve[0].reward + curve[1].reward) / 2  # the first segment is interpolated too
    assert frontier_kl_at(curve, mid) == pytest.approx((curve[0].kl + curve[1].kl) / 2, rel=1e-9)
    assert frontier_kl_at(curve, curve[-1].reward) == curve[-1].kl  # the end is on the curve
    assert math.isnan(frontier_reward_at(curve, curve[-1].kl * 2))
    assert math.isnan(frontier_kl_at(curve, curve[-1].reward + 1.0))
    with pytest.raises(ValueError, match="alpha must be > 0, got 0"):
        frontier_point(REWARDS[0], MIX, 0.0)
