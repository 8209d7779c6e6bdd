"""The one sampling routine: trajectories from the policy or the reference, through the task's
step kernel (DDIM or the flow-matching SDE).

Training, evaluation and every method draw samples here, so they all see the same sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sqdf.core.kl import gaussian_kl
from sqdf.tasks.base import Task


@dataclass
class Trajectories:
    states: Tensor  # (B, T+1, ...): x_T, ..., x_0 on the CPU
    cond: Tensor  # (B,)
    kl: Tensor | None  # (B, T) per-step KL(policy || reference) along the path, if asked for
    logp: Tensor | None = None  # (B, T) log-likelihood of each sampled step under the sampler

    @property
    def x0(self) -> Tensor:
        return self.states[:, -1]

    def select(self, index: Tensor) -> Trajectories:
        pick = lambda t: t[index] if t is not None else None  # noqa: E731
        return Trajectories(self.states[index], self.cond[index], pick(self.kl), pick(self.logp))


def step_mean_std(
    task: Task, x: Tensor, step_index: Tensor, cond: Tensor, *, policy: bool
) -> tuple[Tensor, Tensor]:
    """Mean and std of the policy's (or reference's) Gaussian step k from state x.

    # x: (B, ...); step_index: (B,) long, may differ per sample (replayed cells)
    """
    k = step_index.cpu()
    out = task.model_output(x, task.model_time(k, x), cond, policy=policy)
    return task.kernel.step(out, x, k)


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
    """n full trajectories; all randomness comes from ``generator`` (CPU), so a run is
    reproducible whatever the device. ``cond`` fixes the conditions (else they are drawn)."""
    device = task.device
    cond = task.sample_conditions(n, generator) if cond is None else cond
    x = torch.randn((n, *task.sample_shape), generator=generator).to(device)
    states = [x.cpu()]
    kls, logps = [], []
    cond_d = cond.to(device)
    steps = range(task.kernel.num_steps)
    for k in tqdm(steps, desc=progress, leave=False) if progress else steps:
        ks = torch.full((n,), k, dtype=torch.long)
        mean, std = step_mean_std(task, x, ks, cond_d, policy=policy)
        if with_kl:
            ref_mean, _ = step_mean_std(task, x, ks, cond_d, policy=False)
            kls.append(gaussian_kl(mean, ref_mean, std).cpu())
        z = torch.randn((n, *task.sample_shape), generator=generator).to(device)
        x = mean + std * z
        logps.append(task.kernel.log_prob(x, mean, std).cpu())
        states.append(x.cpu())
    return Trajectories(
        states=torch.stack(states, dim=1),
        cond=cond,
        kl=torch.stack(kls, dim=1) if with_kl else None,
        logp=torch.stack(logps, dim=1),
    )


def rollout_with_grad(
    task: Task,
    cond: Tensor,
    generator: torch.Generator,
    grad_steps: int,
    *,
    x: Tensor | None = None,
    start: int = 0,
    stop: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the policy's chain from step ``start`` (fresh noise unless ``x``) to ``stop``,
    keeping gradients only through the last ``grad_steps`` steps (DRaFT, AlignProp, ReFL).

    Returns the final state and the summed exact KL to the reference over those steps, (B,).
    """
    device = task.device
    stop = task.kernel.num_steps if stop is None else stop
    n = cond.shape[0]
    cond = cond.to(device)
    if x is None:
        x = torch.randn((n, *task.sample_shape), generator=generator).to(device)
    kl = torch.zeros(n, device=device)
    for k in range(start, stop):
        ks = torch.full((n,), k, dtype=torch.long)
        z = torch.randn((n, *task.sample_shape), generator=generator).to(device)
        if k < stop - grad_steps:
            with torch.no_grad():
                mean, std = step_mean_std(task, x, ks, cond, policy=True)
        else:
            mean, std = step_mean_std(task, x, ks, cond, policy=True)
            with torch.no_grad():
                ref_mean, _ = step_mean_std(task, x, ks, cond, policy=False)
            kl = kl + gaussian_kl(mean, ref_mean, std)
        x = mean + std * z
    return x, kl


@torch.no_grad()
def sample_states_at(
    task: Task, n: int, steps: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The states x_t before step ``steps[i, j]`` of n fresh policy trajectories, (n, m, ...),
    running trajectory i only as far as its largest step (a truncated rollout).

    The random draws are those of ``sample_trajectories(task, n, generator)`` (conditions,
    initial noise, then one (n, ...) noise draw per step, used or not), so the states equal a
    full rollout's for the same generator; only the steps nobody needs are not computed.
    Returns the conditions too.

    # steps: (n, m) long in 0..T-1
    """
    device = task.device
    cond = task.sample_conditions(n, generator)
    x = torch.randn((n, *task.sample_shape), generator=generator).to(device)
    cond_d = cond.to(device)
    last = steps.max(dim=1).values  # (n,)
    out = torch.empty((n, steps.shape[1], *task.sample_shape))
    for k in range(int(last.max()) + 1):
        rows, cols = (steps == k).nonzero(as_tuple=True)
        out[rows, cols] = x[rows.to(device)].cpu()
        if k == int(last.max()):
            break
        z = torch.randn((n, *task.sample_shape), generator=generator).to(device)
        active = (last > k).nonzero().squeeze(1).to(device)
        ks = torch.full((active.shape[0],), k, dtype=torch.long)
        mean, std = step_mean_std(task, x[active], ks, cond_d[active], policy=True)
        x[active] = mean + std * z[active]
    return out, cond


def samples_from_seed(
    task: Task, n: int, seed: int, *, policy: bool = True, cond: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(conditions, x0) of n samples whose conditions (unless given) and noise come from
    ``seed`` alone: the policy's and the reference's, drawn with one seed, sit side by side."""
    if cond is None:
        cond = task.sample_conditions(n, torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    return cond, sample_trajectories(task, n, gen, policy=policy, cond=cond).x0


def sample_in_chunks(
    task: Task, n: int, seed: int, progress: Any = False, cond: Tensor | None = None, **kw: Any
) -> Trajectories:
    """n trajectories, in chunks of ``task.eval_batch`` where the task sets one (sd: a
    few images at a time fit any GPU), for conditions ``cond`` (n,) or drawn ones; the same
    seed and chunking give the same noise, for the policy and the reference alike."""
    chunk = task.eval_batch or n
    gen = torch.Generator().manual_seed(seed)
    if chunk >= n:
        return sample_trajectories(
            task, n, gen, cond=cond, progress=progress and f"sampling {progress}", **kw
        )
    cond = task.sample_conditions(n, gen) if cond is None else cond
    parts = [
        sample_trajectories(task, len(c), gen, cond=c, **kw)
        for c in tqdm(cond.split(chunk), desc=f"sampling {progress}", disable=not progress)
    ]
    kl = [t.kl for t in parts]
    return Trajectories(
        states=torch.cat([t.states for t in parts]),
        cond=cond,
        kl=torch.cat(kl) if all(k is not None for k in kl) else None,
        logp=torch.cat([t.logp for t in parts]),
    )
