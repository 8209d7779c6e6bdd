"""How good is each x̂0 estimator along the reference's own trajectories?

The soft Q of SQDF is r(x̂0(x_t)). Its quality at step k is measured against the sample the
trajectory actually reaches: the distance from x̂0(x_t) to that final x0, and how well
r(x̂0(x_t)) predicts r(x0) across samples (Pearson correlation). This is the paper's reason
for a consistency model: sharper estimates at high noise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sqdf.sampling.sampler import Trajectories, sample_trajectories
from sqdf.tasks.base import Task


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


@torch.no_grad()
def x0_estimator_quality(task: Task, num_samples: int = 128, seed: int = 0) -> dict:
    """Per step k (state after step k): RMS distance to the final x0 and reward correlation,
    for the Tweedie and the consistency-model estimators, on reference trajectories."""
    traj: Trajectories = sample_trajectories(
        task, num_samples, torch.Generator().manual_seed(seed), policy=False
    )
    dev = task.device
    cond = traj.cond.to(dev)
    x0 = traj.x0.to(dev)
    r0 = task.reward(x0, cond).cpu()
    out: dict[str, list] = {
        k: [] for k in ("step", "timestep", "tweedie_rmse", "cm_rmse", "tweedie_corr", "cm_corr")
    }
    for k in range(task.kernel.num_steps - 1):  # after the last step the state is x0 itself
        x = traj.states[:, k + 1].to(dev)
        state = torch.full((num_samples,), k + 1)
        for name, est in (
            ("tweedie", task.reference_x0(x, state, cond)),
            ("cm", task.consistency_x0(x, task.model_time(state, x), cond)),
        ):
            out[f"{name}_rmse"].append(float((est - x0).pow(2).flatten(1).mean(1).sqrt().mean()))
            out[f"{name}_corr"].append(_pearson(task.reward(est, cond).cpu(), r0))
        out["step"].append(k)
        out["timestep"].append(task.kernel.model_time(torch.tensor([k + 1])).item())
    return {"num_samples": num_samples, **out}
