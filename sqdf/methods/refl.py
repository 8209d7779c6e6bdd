"""ReFL (Xu et al., 2023, ImageReward): run the policy's chain without gradients to a random
late step, take that one step with gradients, and reward the policy's one-step (Tweedie)
prediction of x0 from the state it reached. The ImageReward code draws the step from the last
quarter of the schedule (steps 30-39 of 40); ``min_frac`` = 0.75 follows it.
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
class ReflParams:
    min_frac: float = 0.75  # the gradient step is drawn from the last (1 - min_frac) of the chain

    def __post_init__(self) -> None:
        if not 0 <= self.min_frac < 1:
            raise ValueError(f"min_frac must be in [0, 1), got {self.min_frac}")


def refl_loss(
    task: Task, cells: Cells, cfg: TrainConfig, params: ReflParams, generator: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    T = task.kernel.num_steps
    lo = min(int(params.min_frac * T), T - 1)
    k = int(torch.randint(lo, T, (1,), generator=generator))
    x, kl = rollout_with_grad(task, cells.cond, generator, grad_steps=1, stop=k + 1)
    cond = cells.cond.to(task.device)
    if k == T - 1:
        x0 = x
    else:  # the policy's own one-step prediction from the state the step reached
        state = torch.full((x.shape[0],), k + 1)
        out = task.model_output(x, task.model_time(state, x), cond, policy=True)
        x0 = task.kernel.x0(out, x, state)
    reward = task.reward(x0, cond)
    stats = {"kl_mean": kl.detach().mean().item(), "q_mean": reward.detach().mean().item(),
             "reward_evals": float(reward.shape[0])}  # fmt: skip
    return -reward.mean(), stats
