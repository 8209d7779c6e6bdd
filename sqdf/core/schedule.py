"""The DDIM sampling schedule: which noise levels the sampler visits, and each step's sigma."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sqdf.core.ddim import ddim_sigma

BETA_SCHEDULES = ("linear", "scaled_linear")


@dataclass(frozen=True)
class DDIMSchedule:
    """A T-step DDIM schedule over a discrete VP forward process.

    Step ``k`` (k = 0 the first, noisiest step; k = T-1 the last) goes from train timestep
    ``timesteps[k]`` to ``prev_timesteps[k]``; a negative previous timestep means the
    final noise level ``final_alpha_cumprod``.
    """

    alphas_cumprod: Tensor  # (num_train_timesteps,) float32
    timesteps: Tensor  # (T,) int64, descending
    prev_timesteps: Tensor  # (T,) int64, last entry may be negative
    final_alpha_cumprod: float
    eta: float

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def abar(self, timesteps: Tensor) -> Tensor:
        """alpha-bar at (possibly negative = final) train timesteps; float32, same shape."""
        t = timesteps.long()
        safe = self.alphas_cumprod[t.clamp(min=0)]
        final = torch.full_like(safe, self.final_alpha_cumprod)
        return torch.where(t >= 0, safe, final)

    @property
    def abar_t(self) -> Tensor:  # (T,)
        return self.abar(self.timesteps)

    @property
    def abar_prev(self) -> Tensor:  # (T,)
        return self.abar(self.prev_timesteps)

    @property
    def sigmas(self) -> Tensor:  # (T,) standard deviation of each step's Gaussian policy
        return ddim_sigma(self.abar_t, self.abar_prev, self.eta)


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, kind: str) -> Tensor:
    """Betas exactly as diffusers builds them (float32), so our schedule matches its schedulers."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if kind == "scaled_linear":
        return (
            torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32)
            ** 2
        )
    raise ValueError(f"unknown beta schedule {kind!r}; expected one of {BETA_SCHEDULES}")


def make_ddim_schedule(
    num_steps: int,
    *,
    eta: float = 1.0,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    steps_offset: int = 1,
    set_alpha_to_one: bool = False,
    alphas_cumprod: Tensor | None = None,
) -> DDIMSchedule:
    """A DDIM schedule with diffusers' "leading" timestep spacing.

    The defaults are Stable Diffusion's scheduler config. They matter for the KL: with
    ``steps_offset=1`` and ``set_alpha_to_one=False`` the last step goes from t=1 to
    alpha-bar(0) < 1, so its sigma is small but positive and the per-step KL stays finite.
    With ``set_alpha_to_one=True`` or ``steps_offset=0`` the last step is deterministic
    (sigma = 0) and the KL is undefined; callers that need a KL must reject such a
    schedule (see ``DDIMSchedule.sigmas``).
    """
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if alphas_cumprod is None:
        betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    alphas_cumprod = alphas_cumprod.to(torch.float32)
    n_train = int(alphas_cumprod.shape[0])
    step_ratio = n_train // num_steps
    timesteps = torch.arange(num_steps, dtype=torch.int64).flip(0) * step_ratio + steps_offset
    if int(timesteps[0]) >= n_train:
        raise ValueError(f"steps_offset={steps_offset} puts the first timestep past {n_train - 1}")
    final = 1.0 if set_alpha_to_one else float(alphas_cumprod[0])
    return DDIMSchedule(
        alphas_cumprod=alphas_cumprod,
        timesteps=timesteps,
        prev_timesteps=timesteps - step_ratio,
        final_alpha_cumprod=final,
        eta=float(eta),
    )
