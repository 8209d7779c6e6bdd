"""Probability-flow ODE solved to x0: the exact consistency function of a known denoiser."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def pf_ode_x0(
    x0_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    abar: Tensor,
    num_steps: int = 12,
    rho: float = 7.0,
    lam_min: float = 2e-3,
) -> Tensor:
    """Solve the probability-flow ODE from x at level abar to noise-free x0.

    # x: (B, ...); abar: (B,) in (0, 1]; x0_fn(x, abar) -> posterior mean E[x0 | x], like x
    In y = x / sqrt(ᾱ) and λ = sqrt((1-ᾱ)/ᾱ) the VP flow reads dy/dλ = (y - x̂0)/λ. We take
    ``num_steps - 1`` Heun steps on an EDM (rho) grid down to ``lam_min`` and then the exact
    Euler step to λ = 0, which is x̂0 itself: below lam_min the data is resolved, and the
    slope's 1/λ would only amplify float32 round-off. Differentiable in x.
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    abar = abar.to(x.dtype)
    lam_start = ((1.0 - abar) / abar).clamp(min=0.0).sqrt()
    direct = lam_start <= lam_min  # already (almost) clean: one denoiser call is the answer
    lam_hi = lam_start.clamp(min=lam_min)
    n = max(num_steps - 1, 1)
    frac = torch.linspace(0.0, 1.0, n + 1, dtype=x.dtype, device=x.device)[:, None]
    lam_grid = (
        lam_hi[None] ** (1 / rho) + frac * (lam_min ** (1 / rho) - lam_hi[None] ** (1 / rho))
    ) ** rho

    def denoise(y: Tensor, lam: Tensor) -> Tensor:
        a = 1.0 / (1.0 + lam**2)
        return x0_fn(y * a.sqrt().view(shape), a)

    y = x / abar.sqrt().view(shape)
    if num_steps > 1:
        for i in range(n):
            lam, lam_next = lam_grid[i], lam_grid[i + 1]
            h = (lam_next - lam).view(shape)
            d = (y - denoise(y, lam)) / lam.view(shape)
            y_euler = y + h * d
            d_next = (y_euler - denoise(y_euler, lam_next)) / lam_next.view(shape)
            y = y + h * 0.5 * (d + d_next)
    # one step means no Heun step: the Euler step from the start to λ = 0 is Tweedie's x̂0
    out = denoise(y, lam_grid[-1] if num_steps > 1 else lam_grid[0])
    return torch.where(direct.view(shape), x0_fn(x, abar), out)
