"""What a task provides to the sampler, the methods and the evaluator."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sqdf.core.gaussian_q import (
    gaussian_soft_value,
    isotropic_soft_value,
    tweedie_covariance,
    tweedie_isotropic_variance,
)
from sqdf.core.kernel import StepKernel
from sqdf.core.schedule import DDIMSchedule
from sqdf.errors import SqdfError

GAUSSIAN_POSTERIOR = "gaussian_posterior"


class Task(ABC):
    """A frozen reference diffusion model, a trainable policy on top of it, a reward and metrics.

    Subclasses set ``kernel`` (their sampler family's step: sqdf.core.kernel), ``policy`` (an
    ``nn.Module`` holding every trainable parameter), ``reward_model`` (a reward from
    ``sqdf.rewards``), ``estimator`` and ``sample_shape``, and implement the abstract methods
    below. The model is called at the kernel's times (``kernel.model_time``).
    """

    kernel: StepKernel
    policy: nn.Module
    reward_model: Any
    estimator: str
    sample_shape: tuple[int, ...]
    alpha: float  # the KL weight, summed convention (set by build_task)
    q_draws: int  # estimator "gaussian_posterior": draws per soft value (set by build_task)
    q_cov: str = "full"  # estimator "gaussian_posterior": "full" or "isotropic" (build_task)
    q_probes: int = 1  # q_cov "isotropic": Hutchinson probes of the trace (build_task)
    eval_samples: int = 4096  # sqdf eval's default sample count
    eval_batch: int | None = None  # evaluation samples per chunk (None: all at once)
    picture_samples: int = 1024  # samples in each --sample-every picture (gmm2d: a scatter)
    device: torch.device = torch.device("cpu")
    # whether ``policy`` is the very network the task calls, so FSDP can shard it (a LoRA
    # wrapper is not: the task calls the network inside it)
    shardable: bool = True

    @abstractmethod
    def sample_conditions(self, n: int, generator: torch.Generator) -> Tensor:
        """n conditions (class indices, prompt indices...) as a (n,) tensor on the CPU."""

    @abstractmethod
    def model_output(self, x: Tensor, times: Tensor, cond: Tensor, *, policy: bool) -> Tensor:
        """Policy (policy=True) or reference output at the kernel's model ``times`` (B,)."""

    @abstractmethod
    def consistency_x0(self, x: Tensor, times: Tensor, cond: Tensor) -> Tensor:
        """x̂0 by the task's (frozen, differentiable) consistency function at model ``times``."""

    @abstractmethod
    def evaluate(
        self, samples: Tensor, ref_samples: Tensor, cond: Tensor, generator: torch.Generator
    ) -> dict:
        """Task-specific metrics of policy samples, with the reference's for comparison; both
        sets were drawn for the same conditions ``cond``."""

    @abstractmethod
    def plot_samples(
        self, samples: Tensor, ref_samples: Tensor | None, cond: Tensor, path: Path
    ) -> None:
        """A picture of samples (and optionally the reference's) saved to ``path``."""

    def save_final(self, folder: Path, policy: dict[str, Tensor]) -> None:  # noqa: B027
        """Extra files for the run's final/ folder beside policy.safetensors, from the
        policy's whole state dict ``policy`` (none here)."""

    def reward_input(self, x0: Tensor) -> Tensor:
        """What a reward (or an oracle, or a proxy) scores: x0 as the user sees it (digits:
        [0, 1] pixels); differentiable. The identity where the sample space is that already."""
        return x0

    def reward_conditions(self, cond: Tensor | None) -> Any:
        """The conditions as a reward, an oracle or a user's function receives them: the
        condition tensor itself (class indices) here; prompt strings for Stable Diffusion."""
        return cond

    def reward(self, x0: Tensor, cond: Tensor | None) -> Tensor:
        """r(x0, cond) per sample, x0 in the model's sample space; (B,)."""
        return self.reward_model(self.reward_input(x0), self.reward_conditions(cond))

    def eval_reward(self, x0: Tensor, cond: Tensor | None) -> Tensor:
        """The reward evaluation reports, (B,): :meth:`reward`, unless the task trains on a
        variant of it (sd's reference_compat), which evaluation leaves out so that runs
        compare."""
        return self.reward(x0, cond)

    def reward_with_parts(self, x0: Tensor, cond: Tensor | None) -> tuple[Tensor, dict]:
        """:meth:`reward` and, for a mixture of rewards, each component's value by name (an
        empty dict for a single reward): one evaluation of each component serves both."""
        parts_of = getattr(self.reward_model, "parts", None)
        if parts_of is None:
            return self.reward(x0, cond), {}
        parts = parts_of(self.reward_input(x0), self.reward_conditions(cond))
        return self.reward_model.combine(parts), parts

    def model_time(self, k: Tensor, like: Tensor) -> Tensor:
        """The model's time input at state(s) ``k``, on ``like``'s device."""
        return self.kernel.model_time(k.cpu()).to(like.device)

    def reference_x0(self, x: Tensor, k: Tensor, cond: Tensor) -> Tensor:
        """x̂0 of state(s) k by the reference model's one-step prediction (Tweedie)."""
        out = self.model_output(x, self.model_time(k, x), cond, policy=False)
        return self.kernel.x0(out, x, k.cpu())

    def soft_q(
        self,
        x_prev: Tensor,
        step_index: Tensor,
        cond: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The soft Q-value of step k that reached x_prev, (B,): SQDF's training-free estimate
        r(x̂0(x_prev)) (the reward itself after the last step); with estimator
        "gaussian_posterior", the log-mean-exp of the reward over ``q_draws`` draws from a
        Gaussian with the posterior's mean and covariance, full or isotropic (``q_cov``;
        sqdf.core.gaussian_q; ``generator`` draws them and the isotropic trace's probe). A
        task that knows the exact soft value (gmm2d, estimator "exact") gives that instead."""
        if self.estimator != GAUSSIAN_POSTERIOR:
            return self.reward(self.x0_after_step(x_prev, step_index, cond), cond)
        x0_fn, reward_fn, scale, spread = self.posterior_parts(x_prev, step_index, cond)
        dim = math.prod(self.sample_shape)
        z = torch.randn((len(x_prev), self.q_draws, dim), generator=generator).to(x_prev)
        if self.q_cov == "isotropic":
            signs = torch.randint(0, 2, (len(x_prev), self.q_probes, dim), generator=generator)
            probes = (2.0 * signs - 1.0).to(x_prev)
            mean, var = tweedie_isotropic_variance(x0_fn, x_prev, scale, spread, probes)
            value = isotropic_soft_value(reward_fn, mean, var, self.alpha, z)
        else:
            mean, cov = tweedie_covariance(x0_fn, x_prev, scale, spread)
            value = gaussian_soft_value(reward_fn, mean, cov, self.alpha, z)
        last = (step_index == self.kernel.num_steps - 1).to(x_prev.device)
        return torch.where(last, self.reward(x_prev, cond), value)

    def posterior_parts(
        self, x_prev: Tensor, step_index: Tensor, cond: Tensor
    ) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], Tensor, Tensor]:
        """What sqdf.core.gaussian_q needs at the state step k reached: the reference's x̂0 of
        a state, the reward of flat draws (``q_draws`` per state), and the state's marginal
        scale and spread (x = scale · x0 + spread · ε)."""
        state = (step_index.cpu() + 1).clamp(max=self.kernel.num_steps - 1)  # last: unused
        scale, spread = (v.to(x_prev.device) for v in self.kernel.marginal(state))
        cond_k = cond.repeat_interleave(self.q_draws, dim=0)

        def x0_fn(x: Tensor) -> Tensor:
            return self.reference_x0(x, state, cond)

        def reward_fn(d: Tensor) -> Tensor:
            return self.reward(d.view(-1, *self.sample_shape), cond_k)

        return x0_fn, reward_fn, scale, spread

    def x0_after_step(self, x_prev: Tensor, step_index: Tensor, cond: Tensor) -> Tensor:
        """x̂0 of the state reached by step k (state k + 1): the frozen estimator, or x_prev
        itself after the last step, where x_prev already is the sample.

        # x_prev: (B, ...); step_index: (B,) long
        """
        T = self.kernel.num_steps
        state = (step_index.cpu() + 1).clamp(max=T - 1)  # after the last step: unused below
        if self.estimator in ("tweedie", GAUSSIAN_POSTERIOR):  # the posterior's mean
            est = self.reference_x0(x_prev, state, cond)
        elif self.estimator == "consistency":
            est = self.consistency_x0(x_prev, self.model_time(state, x_prev), cond)
        else:  # "exact" gives the soft value itself (soft_q), not an x̂0
            raise SqdfError(f"estimator {self.estimator!r} gives no x̂0")
        last = _expand(step_index == T - 1, x_prev)
        return torch.where(last, x_prev, est)


def _expand(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcasting against ``like``."""
    return v.view((-1,) + (1,) * (like.dim() - 1))


def schedule_of(scheduler: Any, num_steps: int, eta: float, what: str) -> DDIMSchedule:
    """Our DDIM schedule over a diffusers scheduler's training noise levels and spacing;
    a schedule with a deterministic step is refused (the KL needs sigma > 0)."""
    from sqdf.core.schedule import make_ddim_schedule
    from sqdf.errors import SqdfError

    schedule = make_ddim_schedule(
        num_steps,
        eta=eta,
        alphas_cumprod=scheduler.alphas_cumprod,
        steps_offset=scheduler.config.steps_offset,
        set_alpha_to_one=scheduler.config.set_alpha_to_one,
    )
    if bool((schedule.sigmas <= 0).any()):
        raise SqdfError(f"{what}: the schedule makes a deterministic step; the KL needs sigma > 0")
    return schedule
