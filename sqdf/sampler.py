"""The one sampling routine: DDIM trajectories from the policy or the reference.

Training, evaluation and every method draw samples here, so they all see the same sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sqdf.core.ddim import ddim_step_mean_std
from sqdf.core.kl import gaussian_kl
from sqdf.tasks.base import Task, _expand


@dataclass
class Trajectories:
    states: Tensor  # (B, T+1, ...): x_T, ..., x_0 on the CPU
    cond: Tensor  # (B,)
    kl: Tensor | None  # (B, T) per-step KL(policy || reference) along the path, if asked for

    @property
    def x0(self) -> Tensor:
        return self.states[:, -1]


def step_mean_std(
    task: Task, x: Tensor, step_index: Tensor, cond: Tensor, *, policy: bool
) -> tuple[Tensor, Tensor]:
    """Mean and std of the policy's (or reference's) Gaussian step k from state x.

    # x: (B, ...); step_index: (B,) long, may differ per sample (replayed cells)
    """
    sched = task.schedule
    k = step_index.cpu()
    t = sched.timesteps[k].to(x.device)
    abar_t = _expand(sched.abar(sched.timesteps[k]), x).to(x)
    abar_prev = _expand(sched.abar(sched.prev_timesteps[k]), x).to(x)
    out = task.model_output(x, t, cond, policy=policy)
    return ddim_step_mean_std(out, x, abar_t, abar_prev, sched.eta, task.prediction_type)


@torch.no_grad()
def sample_trajectories(
    task: Task,
    n: int,
    generator: torch.Generator,
    *,
    policy: bool = True,
    with_kl: bool = False,
    cond: Tensor | None = None,
    progress: str | None = None,
) -> Trajectories:
    """n full DDIM trajectories; all randomness comes from ``generator`` (CPU), so a run is
    reproducible whatever the device. ``cond`` fixes the conditions (else they are drawn)."""
    device = task.device
    cond = task.sample_conditions(n, generator) if cond is None else cond
    x = torch.randn((n, *task.sample_shape), generator=generator).to(device)
    states = [x.cpu()]
    kls = []
    cond_d = cond.to(device)
    steps = range(task.schedule.num_steps)
    for k in tqdm(steps, desc=progress, leave=False) if progress else steps:
        ks = torch.full((n,), k, dtype=torch.long)
        mean, std = step_mean_std(task, x, ks, cond_d, policy=policy)
        if with_kl:
            ref_mean, _ = step_mean_std(task, x, ks, cond_d, policy=False)
            kls.append(gaussian_kl(mean, ref_mean, std).cpu())
        z = torch.randn((n, *task.sample_shape), generator=generator).to(device)
        x = mean + std * z
        states.append(x.cpu())
    return Trajectories(
        states=torch.stack(states, dim=1),
        cond=cond,
        kl=torch.stack(kls, dim=1) if with_kl else None,
    )
