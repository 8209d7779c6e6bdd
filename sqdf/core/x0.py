"""x̂0 estimators: Tweedie's one-step prediction and the consistency-model parameterisation."""

from __future__ import annotations

from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def predict_x0_and_eps(
    model_output: Tensor, x_t: Tensor, abar_t: Tensor, prediction_type: str = "epsilon"
) -> tuple[Tensor, Tensor]:
    """(x̂0, ε̂) from a model output at noise level abar_t; abar_t broadcasts against x_t.

    For an epsilon model this is Tweedie's formula x̂0 = (x_t - sqrt(1-ᾱ) ε̂) / sqrt(ᾱ),
    i.e. the posterior mean E[x0 | x_t] when ε̂ is the exact noise prediction.
    """
    a = abar_t
    b = 1.0 - a
    if prediction_type == "epsilon":
        return (x_t - b.sqrt() * model_output) / a.sqrt(), model_output
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - b.sqrt() * model_output, a.sqrt() * model_output + b.sqrt() * x_t
    if prediction_type == "sample":
        return model_output, (x_t - a.sqrt() * model_output) / b.sqrt()
    raise ValueError(
        f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}"
    )


def tweedie_x0(
    model_output: Tensor, x_t: Tensor, abar_t: Tensor, prediction_type: str = "epsilon"
) -> Tensor:
    """Tweedie / one-step x̂0 of x_t (the DDIM scheduler's ``pred_original_sample``)."""
    return predict_x0_and_eps(model_output, x_t, abar_t, prediction_type)[0]


def lcm_boundary_scalings(
    timestep: Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5
) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of a latent consistency model at discrete train timestep(s).

    They enforce f(x, t≈0) = x: c_skip -> 1 and c_out -> 0 as t -> 0.
    """
    s = timestep.double() * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip.float(), c_out.float()


def consistency_x0(
    model_output: Tensor,
    x_t: Tensor,
    abar_t: Tensor,
    timestep: Tensor,
    prediction_type: str = "epsilon",
    timestep_scaling: float = 10.0,
) -> Tensor:
    """Consistency-model x̂0 = c_skip(t) x_t + c_out(t) x̂0_pred(x_t); t broadcasts like abar_t."""
    x0 = tweedie_x0(model_output, x_t, abar_t, prediction_type)
    c_skip, c_out = lcm_boundary_scalings(timestep, timestep_scaling)
    return c_out.to(x0.dtype) * x0 + c_skip.to(x0.dtype) * x_t


def nearest_timesteps(timesteps: Tensor, grid: Tensor) -> Tensor:
    """Each of ``timesteps`` replaced by the nearest value of ``grid``, on a tie the first in
    ``grid``'s order (the SQDF reference code's argmin over LCMScheduler's descending
    timesteps): a latent consistency model read at the timesteps it was distilled at."""
    grid = grid.to(timesteps.device, timesteps.dtype)
    diff = (timesteps.reshape(-1, 1) - grid.reshape(1, -1)).abs()
    return grid[diff.argmin(dim=1)].reshape(timesteps.shape)


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of a guidance scale, (B,) -> (B, dim): the ``timestep_cond`` an LCM
    UNet distilled with guidance takes. The scale is multiplied by 1000 first so it spans the
    same frequencies as a timestep."""
    import math

    import torch

    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb
