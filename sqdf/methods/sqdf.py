"""SQDF: reparameterised policy gradient of the training-free soft Q-function.

Per replayed cell (x_t, k):
    x_{t-1} = mean_θ(x_t) + σ_t z,  z ~ N(0, I)            (one step, with gradients)
    L = -γ^(T-k-1) r(x̂0(x_{t-1}))  +  α ||mean_θ - mean_ref||² / (2σ_t²)
(on gmm2d, estimator "exact" puts the exact soft value V(x_{t-1}) in place of r(x̂0(x_{t-1}));
estimator "gaussian_posterior" the log-mean-exp of r over draws from the posterior's Gaussian).
The reward gradient flows through the frozen x̂0 estimator into x_{t-1} and mean_θ; nothing
is back-propagated through the rest of the chain, so memory is one step.

With ``q_at = "reference_mean"`` the soft Q is taken to first order about the reference's
step mean instead of at the drawn x_{t-1}:

    Q(x_{t-1}) ≈ Q(mean_ref) + ∇Q(mean_ref) · (x_{t-1} - mean_ref)

(value and gradient computed once, without the policy's graph), whose per-step optimum is the
step mean_ref + γ^(T-k-1) (σ²/α) ∇Q(mean_ref): at γ = 1 the first-order step of
sqdf.core.gaussian_step, which with the exact soft value on gmm2d lands nearer the target than
the optimum of the Q at x_{t-1} does (docs/results/gmm2d-mixtures.md, "What a perfectly
trained policy reaches").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sqdf.config.train_config import TrainConfig
from sqdf.core.kl import gaussian_kl
from sqdf.core.loss import soft_q_loss
from sqdf.sampling.buffer import Cells
from sqdf.sampling.sampler import step_mean_std
from sqdf.tasks.base import Task

Q_POINTS = ("sample", "reference_mean")


@dataclass
class SqdfParams:
    """Where the soft Q is read: at the drawn x_{t-1} ("sample", the paper's) or to first
    order about the reference's step mean ("reference_mean"); SQDF's other settings are the
    shared alpha, gamma, estimator and buffer of TrainConfig."""

    q_at: str = "sample"
    # keep only the cells whose soft-Q estimate r(x̂0) is positive, their reward and KL terms
    # both, averaged over all cells: the SQDF reference code's loss (T2I/alignprop_trainer.py
    # lines 545-550), not the method's; on by itself with task_params.reference_compat
    positive_reward_mask: bool = False

    def __post_init__(self) -> None:
        if self.q_at not in Q_POINTS:
            raise ValueError(f"q_at must be one of {', '.join(Q_POINTS)}, got {self.q_at!r}")
        if not isinstance(self.positive_reward_mask, bool):
            raise ValueError(
                f"positive_reward_mask must be true or false, got {self.positive_reward_mask!r}"
            )


def sqdf_loss(
    task: Task, cells: Cells, cfg: TrainConfig, params: SqdfParams, generator: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    dev = task.device
    x_t, step, cond = cells.x_t.to(dev), cells.step, cells.cond.to(dev)
    mean, std = step_mean_std(task, x_t, step, cond, policy=True)
    with torch.no_grad():
        ref_mean, _ = step_mean_std(task, x_t, step, cond, policy=False)
    z = torch.randn(x_t.shape, generator=generator).to(dev)
    x_prev = mean + std * z
    if params.q_at == "reference_mean":
        reward = linearised_q(task, ref_mean, x_prev, step.to(dev), cond, generator)
    else:
        reward = task.soft_q(x_prev, step.to(dev), cond, generator)
    kl = gaussian_kl(mean, ref_mean, std)
    T = task.kernel.num_steps
    loss = soft_q_loss(reward, kl, step.to(dev), T, cfg.gamma, cfg.alpha)
    if params.positive_reward_mask or getattr(task, "reference_compat", False):
        loss = loss * (reward.detach() > 0).to(loss.dtype)
    # the exact soft value is no reward evaluation: only the cells that end a chain are; the
    # Gaussian posterior's is q_draws of them
    ends = int((step == T - 1).sum())
    per_cell = {"exact": 0, "gaussian_posterior": task.q_draws}.get(task.estimator, 1)
    evals = ends + per_cell * (reward.shape[0] - ends)
    stats = {"kl_mean": kl.mean().item(), "q_mean": reward.mean().item(),
             "reward_evals": float(evals)}  # fmt: skip
    return loss.mean(), stats


def linearised_q(
    task: Task,
    anchor: Tensor,
    x_prev: Tensor,
    step: Tensor,
    cond: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """Q(anchor) + ∇Q(anchor) · (x_prev - anchor) per sample, differentiable in x_prev only:
    the value and its gradient at the anchor are constants of the loss.

    # anchor, x_prev: (B, ...); returns (B,)
    """
    at = anchor.detach().requires_grad_(True)
    with torch.enable_grad():
        q = task.soft_q(at, step, cond, generator)
        (grad,) = torch.autograd.grad(q.sum(), at)
    return q.detach() + ((x_prev - at.detach()) * grad).flatten(1).sum(1)
