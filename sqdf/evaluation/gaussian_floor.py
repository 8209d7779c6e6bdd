"""The Gaussian-step floor on gmm2d: the chain whose every step is the optimum of SQDF's
per-step objective over Gaussians of the reference's variance (sqdf.core.gaussian_step) under
the exact soft value, sampled and measured as a trained run is. No network and no training:
where it misses the exact target is what SQDF's objective itself leaves at this many steps, and
a trained run's distance beyond it is the training's. Other fixed-variance steps (the
first-order one, the tilted step's mean) are sampled the same way for comparison."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sqdf.core.gaussian_step import best_gaussian_mean, tilted_mean
from sqdf.core.kl import gaussian_kl
from sqdf.errors import SqdfError
from sqdf.sampling.sampler import sample_trajectories, step_mean_std

PROJECTIONS = ("sqdf", "first_order", "moment")


def _value(task: Any, k: int) -> Any:
    """The soft value of the state step k reaches: the exact one (state k + 1), or the reward
    itself after the last step."""
    last = k == task.kernel.num_steps - 1

    def value(y: Tensor) -> Tensor:
        if last:
            return task.reward(y, None)
        return task.exact_soft_value(y, torch.full((len(y),), k + 1, dtype=torch.long))

    return value


def _gradient(value: Any) -> Any:
    def grad(y: Tensor) -> Tensor:
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            return torch.autograd.grad(value(y).sum(), y)[0]

    return grad


@torch.no_grad()
def sample_gaussian_floor(
    task: Any,
    n: int,
    generator: torch.Generator,
    *,
    projection: str = "sqdf",
    iters: int = 4,
    points: int = 5,
) -> tuple[Tensor, Tensor, float]:
    """n samples of a fixed-variance Gaussian chain on a gmm2d task (its reward and alpha;
    the exact soft value) whose every step is ``projection``: "sqdf", the optimum of SQDF's
    per-step objective (best_gaussian_mean's fixed point); "first_order", its first-order
    step; "moment", the tilted step's mean (tilted_mean). Returns the samples, their path KL
    to the reference's chain (n,), and the largest change of any step's last fixed-point
    iteration (0 where there is none)."""
    if not hasattr(task, "exact_soft_value"):
        raise SqdfError("the Gaussian-step floor needs the exact soft value (task gmm2d)")
    if projection not in PROJECTIONS:
        raise SqdfError(f"projection must be one of {', '.join(PROJECTIONS)}, got {projection!r}")
    x = torch.randn((n, *task.sample_shape), generator=generator, dtype=torch.float64)
    cond = torch.zeros(n, dtype=torch.long)
    kl = torch.zeros(n, dtype=torch.float64)
    worst = 0.0
    for k in range(task.kernel.num_steps):
        mu, std = step_mean_std(task, x, torch.full((n,), k), cond, policy=False)
        value = _value(task, k)
        if projection == "moment":
            m = tilted_mean(mu, std.reshape(-1), value, task.alpha, points=points)
        else:
            m, change = best_gaussian_mean(
                mu, std.reshape(-1), _gradient(value), task.alpha, points=points,
                iters=iters if projection == "sqdf" else 0,
            )  # fmt: skip
            worst = max(worst, 0.0 if change != change else change)  # nan: first order only
        kl += gaussian_kl(m, mu, std)
        x = m + std * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x, kl, worst


def measure_gaussian_floor(
    task: Any, n: int, seed: int, *, projection: str = "sqdf", iters: int = 4, points: int = 5
) -> dict[str, Any]:
    """The chain's samples measured as ``sqdf eval`` measures a run on gmm2d (the task's
    evaluate against n reference samples; reward and path KL means)."""
    g = torch.Generator().manual_seed(seed)
    samples, kl, change = sample_gaussian_floor(
        task, n, g, projection=projection, iters=iters, points=points
    )
    samples = samples.float()
    ref = sample_trajectories(task, n, g, policy=False).states[:, -1]
    cond = torch.zeros(n, dtype=torch.long)
    return {
        "reward_mean": float(task.reward(samples, None).mean()),
        "kl_path": float(kl.mean()),
        "fixed_point_change": change,
        **task.evaluate(samples, ref, cond, g),
    }
