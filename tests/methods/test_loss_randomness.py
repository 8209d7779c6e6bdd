"""Each method's loss draws its randomness from the generator the trainer hands it, never from
torch's global one: the run's generator is what a checkpoint saves and a resume restores, so
a draw from the global generator makes a resumed run differ from an uninterrupted one, and a
loss read twice with one seed differ from itself."""

from __future__ import annotations

import pytest
import torch

from sqdf import TrainConfig
from sqdf.methods import METHODS, build_method_params
from sqdf.methods.grpo import sweep_order
from sqdf.sampling.buffer import ReplayBuffer
from sqdf.sampling.sampler import sample_trajectories
from sqdf.tasks import build_task

GMM = dict(task="gmm2d", num_steps=6, batch_size=4, buffer_size=8, device="cpu",
           task_params={"hidden": 16}, q_draws=4)  # fmt: skip


@pytest.mark.parametrize(
    ("method", "params", "estimator"),
    [
        ("sqdf", {}, "gaussian_posterior"),
        ("sqdf", {"q_at": "reference_mean"}, "gaussian_posterior"),
        ("draft", {}, "tweedie"),
        ("draft_lv", {}, "tweedie"),
        ("alignprop", {}, "tweedie"),
        ("refl", {"min_frac": 0.0}, "tweedie"),
    ],
)
def test_a_loss_draws_only_from_the_generator_it_is_given(method, params, estimator):
    cfg = TrainConfig(**GMM, method=method, estimator=estimator)
    torch.manual_seed(0)
    task = build_task(cfg)
    for p in task.policy.parameters():  # a policy other than the reference
        p.data.normal_(0, 0.1)
    traj = sample_trajectories(task, 4, torch.Generator().manual_seed(0))
    buf = ReplayBuffer(8, cfg.buffer, cfg.num_steps, cfg.gamma)
    buf.add(traj, task.reward(traj.x0, None))
    cells = buf.sample_cells(4, torch.Generator().manual_seed(1))
    settings = build_method_params(method, params)
    state = torch.get_rng_state()
    losses = [
        METHODS[method].loss(task, cells, cfg, settings, torch.Generator().manual_seed(s))[0].item()
        for s in (2, 2)
    ]
    assert torch.equal(torch.get_rng_state(), state)  # the global generator was not drawn from
    assert losses[0] == losses[1]


def test_grpos_sweep_draws_only_from_its_generator():
    state = torch.get_rng_state()
    a = sweep_order(5, 3, torch.Generator().manual_seed(0))
    b = sweep_order(5, 3, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
