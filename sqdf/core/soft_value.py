"""The exact soft value of a Gaussian-mixture reference under a linear or quadratic reward:

    V(x) = alpha · log E_{p_ref(x0 | x_t = x)}[exp(r(x0) / alpha)]

for x_t = s x0 + sqrt(v) ε (the VP path: s = sqrt(ᾱ), v = 1 - ᾱ; the flow path: s = 1 - t,
v = t²). The posterior of a mixture is a mixture (``gmm_posterior``), and the moment generating
function of exp(r/alpha) under each Gaussian component is closed-form for these rewards, so
V is exact and differentiable in x: the soft Q-function SQDF otherwise estimates with
r(x̂0(x)). Used by ``--estimator exact`` on gmm2d, to tell the Q-estimator's bias from the
rest of SQDF's distance to its target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sqdf.core.gmm import GaussianMixture


@dataclass(frozen=True)
class MixturePosterior:
    """p(x0 | x_t) for each of B states: a K-component diagonal Gaussian mixture each.

    log_weights: (B, K) normalised; means, variances: (B, K, D)."""

    log_weights: Tensor
    means: Tensor
    variances: Tensor


def gmm_posterior(
    gmm: GaussianMixture, x: Tensor, scale: Tensor, noise_var: Tensor
) -> MixturePosterior:
    """The posterior of x0 ~ gmm given x = scale · x0 + sqrt(noise_var) ε.

    Component k: x has marginal N(scale m_k, scale² S_k + v), so its posterior weight is
    ∝ w_k N(x; scale m_k, scale² S_k + v), and x0 | x, k is Gaussian with variance
    S_k v / (scale² S_k + v) and mean m_k + S_k scale (x - scale m_k) / (scale² S_k + v).

    # x: (B, D); scale, noise_var: (B,)
    """
    s = scale.to(x.dtype)[:, None, None]  # (B, 1, 1)
    v = noise_var.to(x.dtype)[:, None, None]
    m, S = gmm.means[None].to(x), gmm.variances[None].to(x)  # (1, K, D)
    marginal_var = s * s * S + v  # (B, K, D)
    diff = x[:, None, :] - s * m
    log_lik = -0.5 * (diff.pow(2) / marginal_var + marginal_var.log()).sum(-1)  # (B, K)
    log_w = torch.log_softmax(gmm.weights.to(x).log()[None] + log_lik, dim=-1)
    return MixturePosterior(log_w, m + S * s / marginal_var * diff, S * v / marginal_var)


def linear_log_mgf(means: Tensor, variances: Tensor, b: Tensor, alpha: float) -> Tensor:
    """log E[exp(b·x / alpha)] for x ~ N(means, diag(variances)): b·m/α + Σ b² S / (2α²).

    # means, variances: (..., D); b: (D,); returns (...)
    """
    b = b.to(means)
    return means @ b / alpha + (variances * b * b).sum(-1) / (2 * alpha**2)


def quadratic_log_mgf(
    means: Tensor, variances: Tensor, center: Tensor, curvature: float, alpha: float
) -> Tensor:
    """log E[exp(-(c/2)||x - x*||² / alpha)] for x ~ N(means, diag(variances)):
    Σ_d [-½ log(1 + λ S_d) - (λ/2)(m_d - x*_d)² / (1 + λ S_d)], λ = c/α.

    # means, variances: (..., D); center: (D,); returns (...)
    """
    lam = curvature / alpha
    spread = 1.0 + lam * variances
    sq = (means - center.to(means)).pow(2)
    return (-0.5 * spread.log() - 0.5 * lam * sq / spread).sum(-1)


def soft_value(posterior: MixturePosterior, log_mgf: Tensor, alpha: float) -> Tensor:
    """α log Σ_k w_k E_k[exp(r/α)] from each component's log-MGF (B, K); returns (B,)."""
    return alpha * torch.logsumexp(posterior.log_weights + log_mgf, dim=-1)
