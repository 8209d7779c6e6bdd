"""GRPO for diffusion (DanceGRPO, Xue et al. 2025, on SD 1.4 and FLUX; Flow-GRPO, Liu et al.
2025, on SD 3.5): DDPO's clipped per-step likelihood ratios with the advantage taken relative
to a group of samples of the same condition, plus an optional KL penalty to the reference.

Each fresh batch is B / G groups of G samples: the trainer draws B / G conditions (classes,
prompts) and repeats each G times in a row, and stores only whole groups. A group is such a
block, not a condition value: on gmm2d, where every condition is 0, G still sets the group,
and two blocks that drew the same class on digits are normalised apart, as the two
separately drawn groups they are. Per cell (x_t, x_{t-1}) of trajectory i in group g:

    A_i = clip((r_i - mean_g) / std_g, ±adv_clip)     mean_g, std_g over group g of the newest batch
    ρ   = exp((log p_θ(x_{t-1}|x_t) - log p_old(x_{t-1}|x_t)) / D)          per dimension, as DDPO
    L   = -min(ρ A, clip(ρ, 1 ± clip_range) A)  +  beta · KL(p_θ(·|x_t) || p_ref(·|x_t))

with the exact Gaussian KL of the step, summed over the D dimensions (``gaussian_kl``). std_g
is the group's unbiased sample std, as DanceGRPO's torch ``std`` (Flow-GRPO's numpy std
divides by G, and its SD 3.5 configs take it over the whole batch, ``global_std``). Use
``buffer = "on_policy"``: the cells come from the newest batch, and the replay ratio is the
number of updates per batch.

Defaults and their sources:
- clip_range 1e-4, adv_clip 5: Flow-GRPO's config/base.py (train.clip_range,
  train.adv_clip_max) and DanceGRPO's launch scripts (--clip_range 1e-4 --adv_clip_max 5.0).
- beta 0: Flow-GRPO's base config (train.beta = 0.0), and DanceGRPO's launch scripts set no
  KL term; the run's KL is reported (kl_mean) either way. Flow-GRPO's SD 3.5 runs set 0.04
  (GenEval, OCR) or 0.01 (PickScore) on the KL averaged over dimensions (KL_SCALES
  "half_mean"): the same penalty here is that value / D.
- group_size 4: the papers use larger groups (Flow-GRPO 24 images per prompt on SD 3.5,
  DanceGRPO 12 per prompt for FLUX) with batches to match; 4 divides the default batch_size of
  128 and the small batches of the toy tasks. Raise it with batch_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sqdf.buffer import Cells
from sqdf.config import TrainConfig
from sqdf.methods.ddpo import clipped_ratio_loss, per_condition_advantages
from sqdf.tasks.base import Task


@dataclass
class GrpoParams:
    group_size: int = 4  # samples per condition; must divide batch_size
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    beta: float = 0.0  # weight of the exact, summed per-step KL to the reference

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise ValueError(f"group_size must be a whole number, got {self.group_size!r}")
        if self.group_size < 2:  # one sample has no group to be compared with
            raise ValueError(f"group_size must be >= 2, got {self.group_size}")
        if not self.clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {self.clip_range}")
        if not self.adv_clip > 0:
            raise ValueError(f"adv_clip must be > 0, got {self.adv_clip}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")


def grpo_loss(
    task: Task,
    cells: Cells,
    cfg: TrainConfig,
    params: GrpoParams,
    generator: torch.Generator,
    *,
    group: Tensor,
    batch_reward: Tensor,
    batch_group: Tensor,
) -> tuple[Tensor, dict[str, float]]:
    """``group`` (B,): each cell's group; ``batch_reward``, ``batch_group`` (N,): the newest
    batch's rewards and groups, whose statistics normalise the advantages (the trainer's
    ``newest_groups``)."""
    adv = per_condition_advantages(cells.reward, group, batch_reward, batch_group)
    adv = adv.clamp(-params.adv_clip, params.adv_clip).to(task.device)
    loss, kl, stats = clipped_ratio_loss(task, cells, adv, params.clip_range)
    if params.beta > 0:  # not 0 * KL, which an infinite KL would make NaN
        loss = loss + params.beta * kl.mean()
    return loss, stats
