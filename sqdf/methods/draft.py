"""DRaFT-K and DRaFT-LV (Clark et al., 2024, "Directly fine-tuning diffusion models on
differentiable rewards"), and DRaFT with a KL term.

DRaFT-K: sample a full chain with the policy and back-propagate -r(x0) through the last K
steps only. K = 1 is the paper's recommended setting. DRaFT-LV: K = 1, but the last step is
redone n times (n = 2 in the paper) from fresh re-noisings of x0 to that step's starting
level, averaging the gradients for lower variance. DRaFT+KL adds
alpha × the exact per-step KL to the reference over the steps with gradients, the closest
pure reward-gradient method to SQDF's objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sqdf.config.train_config import TrainConfig
from sqdf.sampling.buffer import Cells
from sqdf.sampling.sampler import rollout_with_grad
from sqdf.tasks.base import Task


@dataclass
class DraftParams:
    k: int = 1  # steps with gradients; DRaFT paper: K = 1 works best
    lv_samples: int = 2  # DRaFT-LV re-noisings of x0; DRaFT paper: n = 2

    def __post_init__(self) -> None:
        if self.k < 1 or self.lv_samples < 1:
            raise ValueError(f"k and lv_samples must be >= 1, got {self.k}, {self.lv_samples}")


def draft_loss(
    task: Task, cells: Cells, cfg: TrainConfig, params: DraftParams, generator: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    return _draft(task, cells, params, generator, kl_weight=0.0)


def draft_kl_loss(
    task: Task, cells: Cells, cfg: TrainConfig, params: DraftParams, generator: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    return _draft(task, cells, params, generator, kl_weight=cfg.alpha)


def _draft(
    task: Task, cells: Cells, params: DraftParams, generator: torch.Generator, kl_weight: float
) -> tuple[Tensor, dict[str, float]]:
    """-r(x0) + kl_weight × KL over the last K steps, back-propagated through those steps."""
    k = min(params.k, task.kernel.num_steps)
    x0, kl = rollout_with_grad(task, cells.cond, generator, grad_steps=k)
    reward = task.reward(x0, cells.cond.to(task.device))
    return (-reward + kl_weight * kl).mean(), _stats(reward, kl)


def draft_lv_loss(
    task: Task, cells: Cells, cfg: TrainConfig, params: DraftParams, generator: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    T = task.kernel.num_steps
    cond = cells.cond.to(task.device)
    with torch.no_grad():
        x0, _ = rollout_with_grad(task, cells.cond, generator, grad_steps=0)
    # re-noise x0 to the last step's starting level and redo that step with gradients
    last = torch.full((x0.shape[0],), T - 1)
    losses, rewards, kls = [], [], []
    for _ in range(params.lv_samples):
        eps = torch.randn(x0.shape, generator=generator).to(task.device)
        x1 = task.kernel.noise(x0, eps, last)
        x0_new, kl = rollout_with_grad(task, cells.cond, generator, grad_steps=1, x=x1, start=T - 1)
        r = task.reward(x0_new, cond)
        losses.append(-r.mean())
        rewards.append(r)
        kls.append(kl)
    stats = _stats(torch.cat(rewards), torch.cat(kls))
    stats["reward_evals"] = float(len(cells.cond) * params.lv_samples)
    return torch.stack(losses).mean(), stats


def _stats(reward: Tensor, kl: Tensor) -> dict[str, float]:
    return {
        "kl_mean": kl.detach().mean().item(),
        "q_mean": reward.detach().mean().item(),
        "reward_evals": float(reward.shape[0]),
    }
