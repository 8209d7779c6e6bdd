"""GRPO for diffusion (DanceGRPO, Xue et al. 2025, on SD 1.4 and FLUX; Flow-GRPO, Liu et al.
2025, on SD 3.5): DDPO's clipped per-step likelihood ratios with the advantage taken relative
to a group of samples of the same condition, plus an optional KL penalty to the reference.

Each fresh batch is B / G groups of G samples: the trainer draws B / G conditions (classes,
prompts) and repeats each G times in a row, and stores only whole groups. By default a group
is such a block, not a condition value: on gmm2d, where every condition is 0, G still sets the
group, and two blocks that drew the same class on digits are normalised apart, as the two
separately drawn groups they are (``group_by = "condition"`` merges them). Per cell
(x_t, x_{t-1}) of trajectory i in group g:

    A_i = clip((r_i - mean_g) / std_g, ±adv_clip)     mean_g, std_g over group g of the newest batch
    ρ   = exp((log p_θ(x_{t-1}|x_t) - log p_old(x_{t-1}|x_t)) / D)          per dimension, as DDPO
    L   = -min(ρ A, clip(ρ, 1 ± clip_range) A)  +  beta · KL(p_θ(·|x_t) || p_ref(·|x_t))

with the exact Gaussian KL of the step, summed over the D dimensions (``gaussian_kl``), by
default. std_g is the group's unbiased sample std, as DanceGRPO's torch ``std`` (Flow-GRPO's
numpy std divides by G, and its SD 3.5 configs take it over the whole batch: the parity
options below). Use ``buffer = "on_policy"``: the cells come from the newest batch, and the
replay ratio is the number of updates per batch.

Defaults and their sources:
- clip_range 1e-4, adv_clip 5: Flow-GRPO's config/base.py (train.clip_range,
  train.adv_clip_max) and DanceGRPO's launch scripts (--clip_range 1e-4 --adv_clip_max 5.0).
- beta 0: Flow-GRPO's base config (train.beta = 0.0), and DanceGRPO's launch scripts set no
  KL term; the run's KL is reported (kl_mean) either way. Flow-GRPO's SD 3.5 runs set 0.04
  (GenEval, OCR) or 0.01 (PickScore) on mean_d (μ_θ - μ_ref)² / (2 σ_t²) with σ_t the SDE's
  diffusion coefficient, not the step's std: write it with ``kl_scale = "flow_grpo"``, which
  weights our exact KL by β |Δ_k| / D at step k (``FlowKernel.step_kl_weights``).
- group_size 4: the papers use larger groups (Flow-GRPO 24 images per prompt on SD 3.5,
  DanceGRPO 12 per prompt for FLUX) with batches to match; 4 divides the default batch_size of
  128 and the small batches of the toy tasks. Raise it with batch_size.

Flow-GRPO parity (scripts/train_sd3.py, flow_grpo/stat_tracking.py), each off by default:
- ``std = "population"``: numpy's std (over G) plus 1e-4, not the unbiased std floored at 1e-6;
  a near-constant group is damped instead of blown up to unit scale.
- ``global_std``: one std over the whole newest batch, gathered over processes; the mean stays
  the group's.
- ``group_by = "condition"``: a group is every sample of the gathered newest batch with the
  same condition (Flow-GRPO's prompt string), not a block of G.
- ``timestep_fraction``: train steps 0..⌊T f⌋ - 1 only (Flow-GRPO's 0.99 skips the last).
- ``cell_order = "sweep"``: each trajectory's trained steps once per pass over the newest
  batch, trajectories in a random order, each one's steps together, instead of cells drawn
  with replacement. The pass starts again after a resume.
- ``drop_zero_advantage``: cells whose advantage is exactly 0 (a group whose rewards are all
  equal) leave the mean of the loss and of the KL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sqdf.config.train_config import TrainConfig
from sqdf.core.kernel import STEP_KL_SCALES
from sqdf.errors import ConfigError
from sqdf.methods.ddpo import clipped_ratio_loss, masked_mean, per_condition_advantages
from sqdf.sampling.buffer import Cells
from sqdf.tasks.base import Task

STDS = ("sample", "population")
GROUP_BY = ("block", "condition")
CELL_ORDERS = ("random", "sweep")
# Flow-GRPO's epsilon on numpy's std (flow_grpo/stat_tracking.py)
POPULATION_STD_EPS = 1e-4


@dataclass
class GrpoParams:
    group_size: int = 4  # samples per condition; must divide batch_size
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    beta: float = 0.0  # KL weight, in the convention kl_scale names
    # sum: of the exact KL summed over D; mean, half_mean: per dimension (sqdf.core.kl);
    # flow_grpo: Flow-GRPO's beta, β |Δ_k| / D on the exact KL of flow step k
    kl_scale: str = "sum"
    std: str = "sample"  # sample: unbiased, floored at 1e-6; population: numpy's + 1e-4
    global_std: bool = False  # one std over the whole newest batch (all processes)
    group_by: str = "block"  # block: G consecutive samples; condition: equal conditions
    timestep_fraction: float = 1.0  # train steps 0..floor(T f) - 1
    cell_order: str = "random"  # random: drawn with replacement; sweep: each cell once a pass
    drop_zero_advantage: bool = False  # cells with advantage 0 leave the loss's mean

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
        for name, known in (("kl_scale", STEP_KL_SCALES), ("std", STDS),
                            ("group_by", GROUP_BY), ("cell_order", CELL_ORDERS)):  # fmt: skip
            if getattr(self, name) not in known:
                raise ValueError(
                    f"unknown {name} {getattr(self, name)!r}; known: {', '.join(known)}"
                )
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")


def check_kl_scale(task: Task, params: GrpoParams) -> None:
    """Refuse, in one line, a KL convention the task's sampler has no weights for (flow_grpo
    on a DDIM task)."""
    try:
        task.kernel.step_kl_weights(params.beta, params.kl_scale, math.prod(task.sample_shape))
    except ValueError as err:
        raise ConfigError(f"method 'grpo': {err}") from None


def check_buffer_scope(cfg: TrainConfig, params: GrpoParams) -> None:
    """Refuse, in one line, a sweep over a shared buffer: every process would sweep the same
    union of the processes' batches (each cell trained once per process) and the gathers of
    the newest batch would count it once per process."""
    if cfg.buffer_scope == "shared" and params.cell_order == "sweep":
        raise ConfigError(
            "method 'grpo': cell_order sweep with buffer_scope shared trains the same union "
            "of batches on every process and counts it once per process in the groups; use "
            "buffer_scope process"
        )


def sweep_note(cfg: TrainConfig, steps: int, params: GrpoParams) -> str | None:
    """One line where a sweep cannot finish a pass before the next fresh batch replaces it
    (``steps``: the task's sampler steps); None where it can, or without a sweep."""
    if params.cell_order != "sweep":
        return None
    cells = cfg.fresh_count * trained_steps(steps, params.timestep_fraction)
    trained = cfg.batch_size * cfg.grad_accum * cfg.replay_ratio
    if cells <= trained:
        return None
    return (
        f"grpo cell_order sweep: a fresh batch has {cells} trained cells "
        f"({cfg.fresh_count} trajectories x {cells // cfg.fresh_count} steps), more than the "
        f"{trained} (batch_size x grad_accum x replay_ratio) trained before the next batch: "
        "a pass never finishes"
    )


def beta_note(task: Task, params: GrpoParams) -> str | None:
    """One line saying how a beta written in another convention weights the exact summed KL
    at each step; None for beta 0 or the summed convention itself."""
    if params.beta == 0 or params.kl_scale == "sum":
        return None
    dims = math.prod(task.sample_shape)
    weights = task.kernel.step_kl_weights(params.beta, params.kl_scale, dims)
    each = ", ".join(f"{float(w):.3g}" for w in weights)
    return (
        f"grpo beta {params.beta:g} (kl_scale {params.kl_scale}) weights the exact KL summed "
        f"over D = {dims:,} dimensions by {each} at steps 0..{weights.shape[0] - 1}"
    )


def trained_steps(num_steps: int, fraction: float) -> int:
    """How many of the first steps are trained: ⌊T f⌋ (Flow-GRPO's int(T f)), at least one."""
    return max(1, int(num_steps * fraction))


def sweep_order(num_trajectories: int, steps: int, generator: torch.Generator) -> Tensor:
    """One pass over a batch's cells: (num_trajectories · steps, 2) rows (position in the
    batch, step), every trajectory once in a random order with its steps 0..steps-1 together,
    as Flow-GRPO's inner epoch visits them."""
    order = torch.randperm(num_trajectories, generator=generator)
    return torch.stack(
        [order.repeat_interleave(steps), torch.arange(steps).repeat(num_trajectories)], dim=1
    )


def group_advantages(
    reward: Tensor,
    group: Tensor,
    batch_reward: Tensor,
    batch_group: Tensor,
    *,
    std: str = "sample",
    global_std: bool = False,
) -> Tensor:
    """(r - mean_g) / s for each cell's group g, with the statistics of the batch, in float64
    (as Flow-GRPO's numpy), and exactly 0 in a group whose rewards are all equal (a float
    mean of equal values need not be that value, and a loss that drops zero advantages must
    find them).

    # reward, group: (B,) the cells'; batch_reward, batch_group: (N,) the newest batch's
    s: the group's std, or with ``global_std`` the whole batch's; ``std`` "sample" is the
    unbiased std floored at 1e-6 (a group of one falls back to the whole batch), "population"
    numpy's std plus 1e-4 (a group of one gets advantage 0)."""
    reward, batch_reward = reward.double(), batch_reward.double()
    if std == "sample" and not global_std:
        adv = per_condition_advantages(reward, group, batch_reward, batch_group)
    else:

        def spread(pool: Tensor) -> Tensor:
            if std == "population":
                return pool.std(correction=0) + POPULATION_STD_EPS
            return pool.std().clamp(min=1e-6)

        adv = torch.empty_like(reward)
        whole = spread(batch_reward) if global_std else None
        for g in group.unique():
            pool = batch_reward[batch_group == g]
            scale = whole if whole is not None else spread(pool)
            adv[group == g] = (reward[group == g] - pool.mean()) / scale
    for g in group.unique():
        pool = batch_reward[batch_group == g]
        if pool.numel() > 1 and bool(pool.max() == pool.min()):
            adv[group == g] = 0.0
    return adv


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
    kept_cells: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """``group`` (B,): each cell's group; ``batch_reward``, ``batch_group`` (N,): the newest
    batch's rewards and groups (gathered over processes where ``global_std`` or ``group_by``
    asks), whose statistics normalise the advantages
    (``sqdf.training.grouped_cells.gather_newest``). ``kept_cells``: with
    ``drop_zero_advantage``, the update's kept cells per micro-batch, which the loss's sum
    over this micro-batch's kept cells is divided by (every kept cell of the update weighs
    the same, as in Flow-GRPO's filtered batch); None: this micro-batch's."""
    adv = group_advantages(cells.reward, group, batch_reward, batch_group, std=params.std,
                           global_std=params.global_std)  # fmt: skip
    adv = adv.clamp(-params.adv_clip, params.adv_clip).to(task.device, cells.reward.dtype)
    keep = adv != 0 if params.drop_zero_advantage else None
    count = kept_cells if keep is not None else None
    loss, kl, stats = clipped_ratio_loss(task, cells, adv, params.clip_range, keep=keep,
                                         count=count)  # fmt: skip
    if params.beta == 0:  # not 0 * KL, which an infinite KL would make NaN
        return loss, stats
    if params.kl_scale == "sum" and keep is None:
        return loss + params.beta * kl.mean(), stats
    dims = math.prod(cells.x_t.shape[1:])
    weights = task.kernel.step_kl_weights(params.beta, params.kl_scale, dims)[cells.step]
    return loss + masked_mean(weights.to(kl) * kl, keep, count), stats
