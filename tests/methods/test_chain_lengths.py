"""How far each method runs the policy's chain, counted in policy passes: ReFL stops at the
step it draws (k + 1 steps, then the policy's one-step prediction of x0 from the state
reached, where the reward is read); DRaFT-LV runs one chain, then redoes only its last step
lv_samples times."""

from __future__ import annotations

import torch

from sqdf import TrainConfig
from sqdf.methods.draft import DraftParams, draft_lv_loss
from sqdf.methods.refl import ReflParams, refl_loss
from sqdf.sampling.buffer import ReplayBuffer
from sqdf.sampling.sampler import sample_trajectories
from sqdf.tasks import build_task


def _counted(method):
    """A small gmm2d task whose policy passes are counted (appended to the list returned),
    and cells of its replay buffer."""
    cfg = TrainConfig(task="gmm2d", method=method, num_steps=6, batch_size=4, device="cpu",
                      estimator="tweedie", task_params={"hidden": 16})  # fmt: skip
    torch.manual_seed(0)
    task = build_task(cfg)
    buf = ReplayBuffer(8, cfg.buffer, cfg.num_steps, cfg.gamma)
    traj = sample_trajectories(task, 4, torch.Generator().manual_seed(0))
    buf.add(traj, task.reward(traj.x0, None))
    cells = buf.sample_cells(4, torch.Generator().manual_seed(1))
    real, passes = task.model_output, []

    def counted(x, times, cond, *, policy):
        passes[-1] += int(policy)
        return real(x, times, cond, policy=policy)

    task.model_output = counted
    return cfg, task, cells, passes


def test_refl_runs_its_chain_to_the_drawn_step_and_predicts_x0_from_there():
    cfg, task, cells, passes = _counted("refl")
    T = cfg.num_steps
    for seed in range(12):
        passes.append(0)
        refl_loss(task, cells, cfg, ReflParams(min_frac=0.0), torch.Generator().manual_seed(seed))
    # the step k is drawn from 0..T-1: k + 1 steps, and one more pass for x̂0 unless k = T - 1
    assert set(passes) <= set(range(2, T + 1)) and len(set(passes)) > 2


def test_draft_lv_redoes_only_the_last_step():
    cfg, task, cells, passes = _counted("draft_lv")
    conds, reward = [], task.reward
    task.reward = lambda x, cond: conds.append(cond) or reward(x, cond)
    passes.append(0)
    draft_lv_loss(task, cells, cfg, DraftParams(lv_samples=3), torch.Generator().manual_seed(0))
    assert passes == [cfg.num_steps + 3]
    assert len(conds) == 3 and all(torch.equal(c, cells.cond) for c in conds)  # each redo's
