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
from sqdf.training.gradients import truncated_cells

GMM = dict(task="gmm2d", num_steps=6, batch_size=4, buffer_size=8, device="cpu",
           task_params={"hidden": 16}, q_draws=4)  # fmt: skip


@pytest.mark.parametrize(
    ("method", "params", "estimator"),
    [
        ("sqdf", {}, "gaussian_posterior"),
        ("sqdf", {"q_at": "reference_mean"}, "gaussian_posterior"),
        ("draft", {}, "tweedie"),
        ("draft_lv", {}, "tweedie"),
        ("draft_kl", {}, "tweedie"),
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
        for s in (2, 2, 3)
    ]
    assert torch.equal(torch.get_rng_state(), state)  # the global generator was not drawn from
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]  # and it draws from it: another seed, another loss


def test_grpos_sweep_draws_only_from_its_generator():
    state = torch.get_rng_state()
    a = sweep_order(5, 3, torch.Generator().manual_seed(0))
    b = sweep_order(5, 3, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)


def test_truncated_rollouts_draw_only_from_the_run_generator():
    cfg = TrainConfig(**GMM, method="sqdf", estimator="tweedie", rollout="truncated",
                      buffer="on_policy", cells_per_trajectory=2)  # fmt: skip
    torch.manual_seed(0)
    task = build_task(cfg)
    state = torch.get_rng_state()
    a, b = (truncated_cells(task, cfg, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.step, b.step)


def test_alignprops_truncation_is_drawn_from_k_min_to_k_max(monkeypatch):
    # AlignProp back-propagates through the last K steps, K uniform on k_min..k_max
    import sqdf.methods.alignprop as alignprop

    cfg = TrainConfig(**GMM, method="alignprop", estimator="tweedie")
    torch.manual_seed(0)
    task = build_task(cfg)
    drawn = []

    def rollout(task, cond, generator, grad_steps):
        drawn.append(grad_steps)
        return torch.zeros(cond.shape[0], 2), torch.zeros(cond.shape[0])

    monkeypatch.setattr(alignprop, "rollout_with_grad", rollout)
    cells = type("Cells", (), {"cond": torch.zeros(4, dtype=torch.long)})
    for k_max, want in ((0, range(2, 7)), (4, range(2, 5)), (9, range(2, 7))):
        drawn.clear()
        params = build_method_params("alignprop", {"k_min": 2, "k_max": k_max})
        g = torch.Generator().manual_seed(0)
        for _ in range(60):
            alignprop.alignprop_loss(task, cells, cfg, params, g)
        assert set(drawn) == set(want)  # k_max 0 or above T: the chain's T = 6 steps
