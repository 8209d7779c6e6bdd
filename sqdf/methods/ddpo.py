"""DDPO (Black et al., 2024): policy gradient with per-step likelihood ratios and PPO
clipping, on trajectories of the current batch (use ``buffer = "on_policy"``; the replay ratio
is the number of inner updates per batch).

Each cell (x_t, x_{t-1}) of a stored trajectory has the sampler's log-likelihood; the loss is
-min(ρ A, clip(ρ, 1-ε, 1+ε) A) with ρ = p_θ(x_{t-1}|x_t) / p_old(x_{t-1}|x_t) and A the
trajectory's reward normalised per condition over the micro-batch's cells, which the
on-policy buffer draws (with replacement) from the newest batch (DDPO's per-prompt statistics
are over the batch itself), clipped to ±adv_clip. Defaults from the DDPO code: clip_range
1e-4, adv_clip_max 5.

As in the DDPO code, ρ is taken from the log-likelihood averaged over the D dimensions of a
sample (ρ = exp((log p_θ - log p_old) / D)), not summed: clip_range 1e-4 is a trust region on
that scale, and on the summed one it would be D times narrower (D = 16,384 for SD latents).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sqdf.config.train_config import TrainConfig
from sqdf.core.kl import gaussian_kl, gaussian_log_prob
from sqdf.sampling.buffer import Cells
from sqdf.sampling.sampler import step_mean_std
from sqdf.tasks.base import Task


@dataclass
class DdpoParams:
    clip_range: float = 1e-4
    adv_clip: float = 5.0

    def __post_init__(self) -> None:
        if not self.clip_range > 0 or not self.adv_clip > 0:
            raise ValueError(
                f"clip_range and adv_clip must be > 0, got {self.clip_range}, {self.adv_clip}"
            )


def per_condition_advantages(
    reward: Tensor, cond: Tensor, pool_reward: Tensor, pool_cond: Tensor
) -> Tensor:
    """(r - mean_c) / std_c with the statistics of ``pool`` for each condition c."""
    adv = torch.empty_like(reward)
    for c in cond.unique():
        pool = pool_reward[pool_cond == c]
        if pool.numel() < 2:  # too few for statistics: fall back to the whole pool
            pool = pool_reward
        mean, std = pool.mean(), pool.std().clamp(min=1e-6)
        adv[cond == c] = (reward[cond == c] - mean) / std
    return adv


def masked_mean(values: Tensor, keep: Tensor | None, count: float | None = None) -> Tensor:
    """The mean of ``values`` (B,) over the cells ``keep`` marks (all when None); 0, still
    differentiable, when it marks none. ``count``: the denominator instead of the number
    marked (an average over more than this batch)."""
    if keep is None:
        return values.mean()
    kept = torch.where(keep, values, torch.zeros_like(values))
    if count is not None:
        return kept.sum() / (count if count > 0 else 1)
    return kept.sum() / keep.sum().clamp(min=1)


def clipped_ratio_loss(
    task: Task,
    cells: Cells,
    adv: Tensor,
    clip_range: float,
    keep: Tensor | None = None,
    count: float | None = None,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """-min(ρ A, clip(ρ, 1 ± clip_range) A) averaged over the cells (summed over those ``keep``
    marks, when given, and divided by their number or by ``count``), with ρ per dimension
    against the sampler's stored log-likelihood; also each cell's exact step KL to the
    reference (B,) and the statistics DDPO and GRPO report. ``adv``: (B,) on the task's
    device."""
    dev = task.device
    x_t, x_next, cond = cells.x_t.to(dev), cells.x_next.to(dev), cells.cond.to(dev)
    mean, std = step_mean_std(task, x_t, cells.step, cond, policy=True)
    with torch.no_grad():
        ref_mean, _ = step_mean_std(task, x_t, cells.step, cond, policy=False)
    logp = gaussian_log_prob(x_next, mean, std)
    dims = x_next[0].numel()
    ratio = torch.exp((logp - cells.logp.to(dev)) / dims)  # per dimension, as DDPO's code
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), keep, count)
    kl = gaussian_kl(mean, ref_mean, std)
    stats = {"kl_mean": kl.detach().mean().item(), "q_mean": cells.reward.mean().item(),
             "clip_frac": float(((ratio - 1).abs() > clip_range).float().mean()),
             "reward_evals": 0.0}  # fmt: skip
    return loss, kl, stats


def ddpo_loss(
    task: Task, cells: Cells, cfg: TrainConfig, params: DdpoParams, generator: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    # per-condition statistics over the cells, which the on-policy buffer draws from the
    # newest batch only
    adv = per_condition_advantages(cells.reward, cells.cond, cells.reward, cells.cond)
    adv = adv.clamp(-params.adv_clip, params.adv_clip).to(task.device)
    loss, _, stats = clipped_ratio_loss(task, cells, adv, params.clip_range)
    return loss, stats
