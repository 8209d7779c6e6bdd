"""AlignProp (Prabhudesai et al., 2023): back-propagate -r(x0) through a randomly truncated
tail of the policy's chain. The truncation length is drawn uniformly from
[k_min, k_max] each update (AlignProp's randomised truncation; k_max = 0 means the whole
chain). AlignProp uses LoRA and gradient checkpointing to afford long tails; our tasks are
small enough to back-propagate directly.
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
class AlignPropParams:
    k_min: int = 1
    k_max: int = 0  # 0: the number of sampling steps

    def __post_init__(self) -> None:
        if self.k_min < 1 or self.k_max < 0 or (self.k_max and self.k_max < self.k_min):
            raise ValueError(
                f"need 1 <= k_min <= k_max (or k_max = 0), got {self.k_min}, {self.k_max}"
            )


def alignprop_loss(
    task: Task, cells: Cells, cfg: TrainConfig, params: AlignPropParams, generator: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    T = task.kernel.num_steps
    hi = min(params.k_max or T, T)
    k = int(torch.randint(min(params.k_min, hi), hi + 1, (1,), generator=generator))
    x0, kl = rollout_with_grad(task, cells.cond, generator, grad_steps=k)
    reward = task.reward(x0, cells.cond.to(task.device))
    stats = {"kl_mean": kl.detach().mean().item(), "q_mean": reward.detach().mean().item(),
             "reward_evals": float(reward.shape[0])}  # fmt: skip
    return -reward.mean(), stats
