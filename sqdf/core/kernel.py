"""Step kernels: a sampler family's denoising step as a Gaussian policy, behind one interface.

A trajectory visits states k = 0..T (k = 0 pure noise, k = T the sample); step k goes from
state k to state k + 1. Given the model's output at state k, a kernel gives the Gaussian step
N(mean, std² I) to state k + 1, the x̂0 estimate of state k, and the forward marginal at
state k (x0 noised to its level). The sampler, the methods, the replay buffer and the
evaluator only ever talk to this interface, so DDIM (epsilon / v / sample prediction) and the
flow-matching SDE run through the same code. Kernels are small frozen configs over pure
functions (``ddim.py``, ``flow.py``).

# k: (B,) long step or state indices on the CPU; x, output: (B, ...)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from sqdf.core.ddim import ddim_step_mean_std
from sqdf.core.flow import flow_step_mean_std, flow_x0, sde_sigma
from sqdf.core.kl import (
    KL_SCALES,
    alpha_in_sum_convention,
    flow_grpo_kl_weights,
    gaussian_log_prob,
)
from sqdf.core.schedule import DDIMSchedule
from sqdf.core.x0 import tweedie_x0

# the conventions a KL weight may be written in for ``StepKernel.step_kl_weights``
STEP_KL_SCALES = (*KL_SCALES, "flow_grpo")


def _expand(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) on ``like``'s device and dtype."""
    return v.to(like).view((-1,) + (1,) * (like.dim() - 1))


class StepKernel(ABC):
    """One sampler family's step, x̂0 and forward marginal."""

    @property
    @abstractmethod
    def num_steps(self) -> int:
        """T: the number of steps from noise to sample."""

    @abstractmethod
    def model_time(self, k: Tensor) -> Tensor:
        """The time the model is called with at state k (DDIM: the integer train timestep;
        flow: t in (0, 1])."""

    @abstractmethod
    def step(self, output: Tensor, x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of step k from state x, given the model's output there."""

    @abstractmethod
    def x0(self, output: Tensor, x: Tensor, k: Tensor) -> Tensor:
        """x̂0 of state k from the model's output there (the posterior mean for an exact model)."""

    @abstractmethod
    def marginal(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """(scale, spread), (B,) float64: state k's forward marginal is scale · x0 + spread · ε."""

    def noise(self, x0: Tensor, noise: Tensor, k: Tensor) -> Tensor:
        """A draw of state k's forward marginal: x0 noised to its level with ``noise``."""
        # the coefficients in float64, then the sample's dtype: as a scheduler's Python floats
        scale, spread = self.marginal(k)
        return _expand(scale, x0) * x0 + _expand(spread, x0) * noise

    @property
    @abstractmethod
    def stds(self) -> Tensor:
        """(T,) the standard deviation of each step (every one > 0 for a finite KL)."""

    def log_prob(self, x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """The step's log-likelihood of reaching ``x_next``, summed over dimensions: (B,)."""
        return gaussian_log_prob(x_next, mean, std)

    def step_kl_weights(self, weight: float, scale: str, dims: int) -> Tensor:
        """(T,) float64: a KL weight written in convention ``scale`` as the weight of the exact
        summed KL (``gaussian_kl``) at each step. ``scale``: a key of KL_SCALES (one weight for
        every step), or "flow_grpo" (flow kernels only: Flow-GRPO's beta, a weight per step)."""
        if scale == "flow_grpo":
            raise ValueError(
                f"KL scale 'flow_grpo' is Flow-GRPO's beta on the flow SDE's step; "
                f"{type(self).__name__} has no flow grid (use sum, mean or half_mean)"
            )
        summed = alpha_in_sum_convention(weight, scale, dims)
        return torch.full((self.num_steps,), summed, dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class DDIMKernel(StepKernel):
    """DDIM with eta > 0 over a discrete VP schedule, for epsilon, v or sample prediction."""

    schedule: DDIMSchedule
    prediction_type: str = "epsilon"

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def model_time(self, k: Tensor) -> Tensor:
        return self.schedule.timesteps[k]

    def _abar(self, timesteps: Tensor, like: Tensor) -> Tensor:
        return _expand(self.schedule.abar(timesteps), like)

    def step(self, output: Tensor, x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        s = self.schedule
        abar_t = self._abar(s.timesteps[k], x)
        abar_prev = self._abar(s.prev_timesteps[k], x)
        return ddim_step_mean_std(output, x, abar_t, abar_prev, s.eta, self.prediction_type)

    def x0(self, output: Tensor, x: Tensor, k: Tensor) -> Tensor:
        abar = self._abar(self.schedule.timesteps[k], x)
        return tweedie_x0(output, x, abar, self.prediction_type)

    def marginal(self, k: Tensor) -> tuple[Tensor, Tensor]:
        abar = self.schedule.abar(self.schedule.timesteps[k]).double()
        return abar.sqrt(), (1 - abar).sqrt()

    @property
    def stds(self) -> Tensor:
        return self.schedule.sigmas


@dataclass(frozen=True, eq=False)
class FlowKernel(StepKernel):
    """The rectified-flow SDE (``flow.py``) over a time grid ``sigmas`` (T + 1,) from 1 to 0,
    at ``noise_level`` a > 0 (Flow-GRPO uses 0.7); with ``noise_level_end`` the level runs
    linearly over the steps' indices, ``noise_level`` at the first step and
    ``noise_level_end`` at the last (None: one level for the whole chain)."""

    sigmas: Tensor
    noise_level: float
    noise_level_end: float | None = None

    def __post_init__(self) -> None:
        if self.sigmas.dim() != 1 or self.sigmas.shape[0] < 2:
            raise ValueError(
                f"sigmas must be a (T + 1,) grid, got shape {tuple(self.sigmas.shape)}"
            )
        if not bool((self.sigmas[1:] < self.sigmas[:-1]).all()) or float(self.sigmas[-1]) != 0:
            raise ValueError("sigmas must fall strictly and end at 0")
        if not 0 < float(self.sigmas[0]) <= 1:
            raise ValueError(f"sigmas must start in (0, 1], got {float(self.sigmas[0])}")
        if self.noise_level <= 0:
            raise ValueError(
                f"noise_level must be > 0 (the KL needs a stochastic step), got {self.noise_level}"
            )
        if self.noise_level_end is not None and not self.noise_level_end > 0:
            raise ValueError(
                "noise_level_end must be > 0 (the KL needs a stochastic step), got "
                f"{self.noise_level_end}"
            )

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.shape[0]) - 1

    @property
    def t_cap(self) -> Tensor:
        """Where t = 1, σ_t's denominator uses the grid's next time (Flow-GRPO's choice)."""
        return self.sigmas[1]

    @cached_property  # read at every step of a scheduled chain
    def levels(self) -> Tensor:
        """(T,) float64: each step's noise level a_k."""
        end = self.noise_level if self.noise_level_end is None else self.noise_level_end
        return torch.linspace(self.noise_level, end, self.num_steps, dtype=torch.float64)

    def model_time(self, k: Tensor) -> Tensor:
        return self.sigmas[k]

    def step(self, output: Tensor, x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        t, t_next = _expand(self.sigmas[k], x), _expand(self.sigmas[k + 1], x)
        level: float | Tensor = self.noise_level  # one level: the scalar, as Flow-GRPO's
        if self.noise_level_end is not None:
            level = _expand(self.levels[k], x)
        return flow_step_mean_std(output, x, t, t_next, level, self.t_cap.to(x))

    def x0(self, output: Tensor, x: Tensor, k: Tensor) -> Tensor:
        return flow_x0(output, x, _expand(self.sigmas[k], x))

    def marginal(self, k: Tensor) -> tuple[Tensor, Tensor]:
        t = self.sigmas[k].double()
        return 1 - t, t  # the path of flow.flow_noised

    def step_kl_weights(self, weight: float, scale: str, dims: int) -> Tensor:
        if scale != "flow_grpo":
            return super().step_kl_weights(weight, scale, dims)
        step_sizes = self.sigmas[:-1].double() - self.sigmas[1:].double()
        return flow_grpo_kl_weights(weight, step_sizes, dims)

    @property
    def stds(self) -> Tensor:
        t = self.sigmas[:-1].double()
        level = self.noise_level if self.noise_level_end is None else self.levels
        sigma = sde_sigma(t, level, self.t_cap.double())
        return (sigma * (t - self.sigmas[1:].double()).sqrt()).float()
