"""How far each method runs the policy's chain, counted in policy passes: ReFL stops at the
step it draws (k + 1 steps, then the policy's one-step prediction of x0 from the state
reached, where the reward is read); DRaFT-LV runs one chain, then redoes only its last step
lv_samples times."""

from __future__ import annotations

import dataclasses

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
    T, n = cfg.num_steps, cells.cond.shape[0]
    real, calls, rewarded, ends = task.model_output, [], [], set()

    def recorded(x, times, cond, *, policy):
        out = real(x, times, cond, policy=policy)
        calls.append((policy, x.detach(), times, out.detach()))
        return out

    task.model_output = recorded
    reward = task.reward
    task.reward = lambda x, cond: rewarded.append(x.detach()) or reward(x, cond)
    for seed in range(6):  # k = 2, 1, 0, 4, 4, 5
        passes.append(0)
        calls.clear()
        rewarded.clear()
        refl_loss(task, cells, cfg, ReflParams(min_frac=0.0), torch.Generator().manual_seed(seed))
        policy = [c for c in calls if c[0]]
        # by definition step j takes state j to state j + 1, so the policy's j-th pass reads
        # state j: the chain's passes at states 0..k, then x̂0's at state k + 1, the state the
        # k + 1 steps reached
        for j, (_, _, times, _) in enumerate(policy):
            assert torch.equal(times, task.model_time(torch.full((n,), j), times))
        if not calls[-1][0]:  # the gradient step's reference pass ends it: k = T - 1, no x̂0
            assert len(policy) == T
            ends.add(T)
            continue
        # x̂0 is the one-step prediction from state k + 1, where the reward is read
        _, x, _, out = policy[-1]
        k1 = len(policy) - 1
        assert 1 <= k1 <= T - 1
        x0 = task.kernel.x0(out, x, torch.full((n,), k1))
        assert torch.allclose(rewarded[-1], x0, rtol=1e-5, atol=1e-6)
        ends.add(k1)
    # the step k is drawn from 0..T-1: k + 1 steps, and one more pass for x̂0 unless k = T - 1
    assert set(passes) <= set(range(2, T + 1)) and len(set(passes)) > 2
    assert T in ends and len(ends) > 2  # the chain's end and several x̂0 states were seen


def test_draft_lv_redoes_only_the_last_step():
    cfg, task, cells, passes = _counted("draft_lv")
    # conditions that differ from cell to cell (gmm2d's own are all 0, which any zero tensor
    # would match); gmm2d's model and reward ignore them, so only their passing is checked
    cells = dataclasses.replace(cells, cond=torch.tensor([3, 0, 2, 1]))
    conds, reward = [], task.reward
    task.reward = lambda x, cond: conds.append(cond) or reward(x, cond)
    passes.append(0)
    draft_lv_loss(task, cells, cfg, DraftParams(lv_samples=3), torch.Generator().manual_seed(0))
    assert passes == [cfg.num_steps + 3]
    assert len(conds) == 3 and all(torch.equal(c, cells.cond) for c in conds)  # each redo's
