"""One DDIM transition p(x_{t-1} | x_t) as a Gaussian policy N(mean, std² I)."""

from __future__ import annotations

from torch import Tensor

from sqdf.core.x0 import predict_x0_and_eps


def ddim_sigma(abar_t: Tensor, abar_prev: Tensor, eta: float) -> Tensor:
    """DDIM's σ_t(η) = η sqrt((1-ᾱ_prev)/(1-ᾱ_t)) sqrt(1 - ᾱ_t/ᾱ_prev)  (Song et al., eq. 16)."""
    variance = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    return eta * variance.clamp(min=0.0).sqrt()


def ddim_step_mean_std(
    model_output: Tensor,
    x_t: Tensor,
    abar_t: Tensor,
    abar_prev: Tensor,
    eta: float,
    prediction_type: str = "epsilon",
) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of the DDIM step from x_t (level ᾱ_t) to level ᾱ_prev.

    # x_t, model_output: (B, ...); abar_t, abar_prev: scalars or (B, 1, ...) broadcasting
    x_{t-1} = mean + std * z with z ~ N(0, I) reproduces diffusers' ``DDIMScheduler.step``
    (without clipping or thresholding, which would make the policy non-Gaussian).
    """
    x0, eps = predict_x0_and_eps(model_output, x_t, abar_t, prediction_type)
    std = ddim_sigma(abar_t, abar_prev, eta)
    direction = (1.0 - abar_prev - std**2).clamp(min=0.0).sqrt() * eps
    mean = abar_prev.sqrt() * x0 + direction
    return mean, std
