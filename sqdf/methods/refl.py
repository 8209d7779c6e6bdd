"""ReFL (Xu et al., 2023, ImageReward): run the policy's chain without gradients to a random
late step, take that one step with gradients, and reward the policy's one-step (Tweedie)
prediction of x0 from the state it reached. The ImageReward code draws the step from the last
quarter of the schedule (steps 30-39 of 40); ``min_frac`` = 0.75 follows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sqdf.buffer import Cells
from sqdf.config import TrainConfig
from sqdf.core.x0 import tweedie_x0
from sqdf.sampler import rollout_with_grad
from sqdf.tasks.base import Task, _expand


@dataclass
class ReflParams:
    min_frac: float = 0.75  # the gradient step is drawn from the last (1 - min_frac) of the chain

    def __post_init__(self) -> None:
        if not 0 <= self.min_frac < 1:
            raise ValueError(f"min_frac must be in [0, 1), got {self.min_frac}")


def refl_loss(
    task: Task, cells: Cells, cfg: TrainConfig, params: ReflParams, generator: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    T = task.schedule.num_steps
    lo = min(int(params.min_frac * T), T - 1)
    k = int(torch.randint(lo, T, (1,), generator=generator))
    x, kl = rollout_with_grad(task, cells.cond, generator, grad_steps=1, stop=k + 1)
    cond = cells.cond.to(task.device)
    t_prev = task.schedule.prev_timesteps[k].expand(x.shape[0])
    if k == T - 1:
        x0 = x
    else:
        out = task.model_output(x, t_prev, cond, policy=True)
        abar = _expand(task.schedule.abar(t_prev), x).to(x)
        x0 = tweedie_x0(out, x, abar, task.prediction_type)
    reward = task.reward(x0, cond)
    stats = {"kl_mean": kl.detach().mean().item(), "q_mean": reward.detach().mean().item(),
             "reward_evals": float(reward.shape[0])}  # fmt: skip
    return -reward.mean(), stats
