"""Rewards with a closed-form KL-regularised optimum on Gaussian mixtures (the 2-D benchmark)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sqdf.core.gmm import GaussianMixture, tilt_linear, tilt_quadratic
from sqdf.core.soft_value import linear_log_mgf, quadratic_log_mgf


def _vector(name: str, value: object) -> tuple[float, ...]:
    try:
        vec = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of numbers, got {value!r}") from None
    if not vec:
        raise ValueError(f"{name} must not be empty")
    return vec


@dataclass
class LinearReward:
    """r(x) = b·x: pushes mass along b; the optimum re-weights and shifts every mode."""

    b: tuple[float, ...] = (1.0, 0.0)
    domain = "points"

    def __post_init__(self) -> None:
        self.b = _vector("b", self.b)

    def __call__(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        # x: (B, D) -> (B,)
        return x @ torch.tensor(self.b, dtype=x.dtype, device=x.device)

    def tilt(self, gmm: GaussianMixture, alpha: float) -> GaussianMixture:
        return tilt_linear(gmm, torch.tensor(self.b), alpha)

    def log_mgf(self, means: Tensor, variances: Tensor, alpha: float) -> Tensor:
        """log E[exp(r(x)/alpha)] under Gaussians N(means, diag(variances)), (..., D) -> (...)."""
        return linear_log_mgf(means, variances, torch.tensor(self.b), alpha)


@dataclass
class QuadraticReward:
    """r(x) = -(c/2)||x - center||²: a well that rewards one region and can be over-optimised."""

    center: tuple[float, ...] = (3.0, 0.0)
    curvature: float = 1.0
    domain = "points"

    def __post_init__(self) -> None:
        self.center = _vector("center", self.center)
        self.curvature = float(self.curvature)
        if not self.curvature > 0:
            raise ValueError(f"curvature must be > 0, got {self.curvature}")

    def __call__(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        c = torch.tensor(self.center, dtype=x.dtype, device=x.device)
        return -0.5 * self.curvature * (x - c).pow(2).sum(-1)

    def tilt(self, gmm: GaussianMixture, alpha: float) -> GaussianMixture:
        return tilt_quadratic(gmm, torch.tensor(self.center), self.curvature, alpha)

    def log_mgf(self, means: Tensor, variances: Tensor, alpha: float) -> Tensor:
        """log E[exp(r(x)/alpha)] under Gaussians N(means, diag(variances)), (..., D) -> (...)."""
        return quadratic_log_mgf(means, variances, torch.tensor(self.center), self.curvature, alpha)
