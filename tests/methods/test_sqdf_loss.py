"""SQDF's loss reads the soft Q at a reparameterised draw of the policy's step,
x_{t-1} = mean_θ + σ_t z, and its reference-code mask keeps only the cells whose soft-Q
estimate is positive, asked for by itself or by a task's reference_compat."""

from __future__ import annotations

import pytest
import torch

from sqdf.methods.sqdf import SqdfParams, sqdf_loss
from sqdf.run.settings import make_config
from sqdf.sampling.buffer import Cells
from sqdf.sampling.sampler import step_mean_std
from sqdf.tasks import build_task


def _task(**over):
    values = {"task": "gmm2d", "reward": "quadratic", "estimator": "tweedie", "num_steps": 6,
              "task_params": {"hidden": 16}, **over}  # fmt: skip
    cfg = make_config(values, source="test")
    torch.manual_seed(0)
    task = build_task(cfg)
    for p in task.policy.parameters():  # a policy other than the reference
        p.data.normal_(0, 0.1)
    return cfg, task


def _cells(n, step):
    x = torch.tensor([[0.3, -0.2]]).repeat(n, 1)
    return Cells(x_t=x, x_next=None, step=torch.full((n,), step),
                 cond=torch.zeros(n, dtype=torch.long), reward=torch.zeros(n),
                 index=torch.arange(n))  # fmt: skip


def test_the_soft_q_is_read_at_the_policys_step_drawn_with_gaussian_noise():
    cfg, task = _task()
    cells = _cells(4000, 2)
    seen = []
    real = task.soft_q
    task.soft_q = lambda x, *rest: seen.append(x.detach()) or real(x, *rest)
    sqdf_loss(task, cells, cfg, SqdfParams(), torch.Generator().manual_seed(0))
    mean, std = step_mean_std(task, cells.x_t, cells.step, cells.cond, policy=True)
    z = (seen[0] - mean.detach()) / std
    # standard normal draws: mean 0 and std 1 to within a few standard errors (1/sqrt(8000))
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05


def test_the_positive_reward_mask_keeps_only_cells_with_a_positive_soft_q():
    # soft-Q estimates of each sign, 0 among them: the reference code keeps a cell's loss, its
    # KL included, only where the reward is positive (docs/reproducing.md row 8), so 0 is
    # dropped; the loss is averaged over all cells, the dropped ones counted as 0
    cfg, task = _task()
    n, step = 8, 2
    cells = _cells(n, step)
    q = torch.tensor([1.5, 0.0, -0.7, 0.4, 0.0, -2.0, 3.0, -0.1])
    task.soft_q = lambda x, *rest: q + 0 * x.sum(1)
    with torch.no_grad():
        mean, std = step_mean_std(task, cells.x_t, cells.step, cells.cond, policy=True)
        ref, _ = step_mean_std(task, cells.x_t, cells.step, cells.cond, policy=False)
    kl = ((mean - ref) ** 2).sum(1) / (2 * std.reshape(-1) ** 2)  # the definition, per cell
    assert bool((kl > 1e-6).all())  # a dropped cell drops a nonzero KL term
    per_cell = -(cfg.gamma ** (cfg.num_steps - 1 - step)) * q + cfg.alpha * kl
    keep = torch.tensor([1.0, 0, 0, 1, 0, 0, 1, 0])  # q > 0, written out
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain, _ = sqdf_loss(task, cells, cfg, SqdfParams(), g())
    masked, _ = sqdf_loss(task, cells, cfg, SqdfParams(positive_reward_mask=True), g())
    assert plain.item() == pytest.approx(float(per_cell.mean()), rel=1e-5)
    assert masked.item() == pytest.approx(float((per_cell * keep).sum() / n), rel=1e-5)
    task.reference_compat = True
    compat, _ = sqdf_loss(task, cells, cfg, SqdfParams(), g())
    assert compat.item() == pytest.approx(masked.item(), rel=1e-6)
