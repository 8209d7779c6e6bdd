"""Gaussian mixtures with diagonal covariances: density, sampling, exact denoising, tilting.

This is what makes the 2-D benchmark exact: under the VP forward process a mixture stays
a mixture, so the posterior mean E[x0 | x_t] (hence the noise prediction) is closed-form,
and tilting a mixture by exp(r/alpha) with a linear or quadratic r is again a mixture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GaussianMixture:
    weights: Tensor  # (K,) positive, sum 1
    means: Tensor  # (K, D)
    variances: Tensor  # (K, D) diagonal covariances

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def to(self, dtype: torch.dtype) -> GaussianMixture:
        return GaussianMixture(
            self.weights.to(dtype), self.means.to(dtype), self.variances.to(dtype)
        )

    def component_log_prob(self, x: Tensor) -> Tensor:
        """log w_k + log N(x; m_k, S_k) for x: (B, D); returns (B, K)."""
        diff = x[:, None, :] - self.means[None]
        quad = (diff.pow(2) / self.variances[None]).sum(-1)
        logdet = self.variances.log().sum(-1)[None]
        return self.weights.log()[None] - 0.5 * (quad + logdet + self.dim * math.log(2 * math.pi))

    def log_prob(self, x: Tensor) -> Tensor:
        return torch.logsumexp(self.component_log_prob(x), dim=-1)

    def responsibilities(self, x: Tensor) -> Tensor:
        return torch.softmax(self.component_log_prob(x), dim=-1)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[k] + self.variances[k].sqrt() * z

    def noised(self, abar: float) -> GaussianMixture:
        """The marginal of sqrt(ᾱ) x0 + sqrt(1-ᾱ) ε with x0 from this mixture."""
        return GaussianMixture(
            self.weights, abar**0.5 * self.means, abar * self.variances + (1.0 - abar)
        )


def gmm_posterior_mean(gmm: GaussianMixture, x: Tensor, abar: Tensor) -> Tensor:
    """E[x0 | x_t = x] when x0 ~ gmm and x_t = sqrt(ᾱ) x0 + sqrt(1-ᾱ) ε.

    # x: (B, D); abar: (B,); returns (B, D)
    """
    a = abar.to(x.dtype)[:, None, None]  # (B, 1, 1)
    mean_t = a.sqrt() * gmm.means[None]  # (B, K, D)
    var_t = a * gmm.variances[None] + (1.0 - a)  # (B, K, D)
    diff = x[:, None, :] - mean_t
    log_lik = -0.5 * ((diff.pow(2) / var_t) + var_t.log()).sum(-1)  # (B, K)
    resp = torch.softmax(gmm.weights.log()[None] + log_lik, dim=-1)
    cond_mean = gmm.means[None] + a.sqrt() * gmm.variances[None] / var_t * diff
    return (resp[..., None] * cond_mean).sum(1)


def gmm_eps(gmm: GaussianMixture, x: Tensor, abar: Tensor) -> Tensor:
    """The exact noise prediction E[ε | x_t = x] = (x - sqrt(ᾱ) E[x0|x]) / sqrt(1-ᾱ)."""
    a = abar.to(x.dtype)[:, None]
    return (x - a.sqrt() * gmm_posterior_mean(gmm, x, abar)) / (1.0 - a).sqrt()


def _renormalised(log_w: Tensor) -> Tensor:
    return torch.softmax(log_w, dim=0)


def tilt_linear(gmm: GaussianMixture, b: Tensor, alpha: float) -> GaussianMixture:
    """The mixture ∝ gmm(x) exp(b·x / α).

    Per component, N(m, S) e^{b·x/α} = N(m + S b/α, S) · exp(b·m/α + bᵀS b/(2α²)).
    """
    b = b.to(gmm.means.dtype)
    shift = gmm.variances * b[None] / alpha
    log_w = (
        gmm.weights.log()
        + gmm.means @ b / alpha
        + (gmm.variances * b[None] ** 2).sum(-1) / (2 * alpha**2)
    )
    return GaussianMixture(_renormalised(log_w), gmm.means + shift, gmm.variances)


def tilt_quadratic(
    gmm: GaussianMixture, center: Tensor, curvature: float, alpha: float
) -> GaussianMixture:
    """The mixture ∝ gmm(x) exp(-(c/2)||x - x*||² / α).

    The tilt is an unnormalised Gaussian of precision c/α centred at x*; the product with
    N(m, S) has precision 1/S + c/α and weight factor N(m; x*, S + α/c).
    """
    center = center.to(gmm.means.dtype)
    prec = curvature / alpha
    var = 1.0 / (1.0 / gmm.variances + prec)
    mean = var * (gmm.means / gmm.variances + prec * center[None])
    joint_var = gmm.variances + 1.0 / prec
    log_n = -0.5 * ((gmm.means - center[None]).pow(2) / joint_var + joint_var.log()).sum(-1)
    return GaussianMixture(_renormalised(gmm.weights.log() + log_n), mean, var)
