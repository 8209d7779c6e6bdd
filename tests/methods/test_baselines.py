"""Every method trains on both tasks through the one trainer, and each loss does what its
paper says: gradients only where the method puts them, DDPO's ratio and clipping."""

import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file

from sqdf import TrainConfig, read_metrics, train
from sqdf.errors import ConfigError
from sqdf.methods import METHODS, build_method_params
from sqdf.methods.ddpo import ddpo_loss, per_condition_advantages
from sqdf.run.settings import make_config
from sqdf.sampling.buffer import ReplayBuffer
from sqdf.sampling.sampler import rollout_with_grad, sample_trajectories
from sqdf.tasks import build_task
from tests.learning import assert_reward_rose

GMM = dict(num_steps=6, steps=3, batch_size=8, buffer_size=16, checkpoint_every=0, log_every=1,
           device="cpu", estimator="tweedie", task_params={"hidden": 16}, lr=1e-2)  # fmt: skip


def _cfg(method: str, **kw) -> TrainConfig:
    extra = {"buffer": "on_policy", "replay_ratio": 2} if METHODS[method].buffer else {}
    return TrainConfig(**{**GMM, "method": method, **extra, **kw})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_gmm2d(method, tmp_path):
    run = train(_cfg(method), tmp_path / method, progress=False)
    rows = read_metrics(run)
    assert rows[-1]["skipped_updates"] == 0 and rows[-1]["reward_evals"] > 0
    assert all(math.isfinite(rows[-1][k]) for k in METHODS[method].stats)  # all it declares
    w = load_file(str(run / "final" / "policy.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())
    assert float(w["net.4.weight"].abs().max()) > 0  # the zero-initialised output layer moved


@pytest.mark.parametrize("method", ["draft", "refl", "ddpo"])
def test_methods_train_digits(method, tmp_path):
    cfg = _cfg(
        method,
        task="digits",
        num_steps=3,
        batch_size=4,  # DDPO's advantages need two different trajectories in a micro-batch
        buffer_size=8,
        steps=2,
        task_params={"classes": [1]},
    )
    assert_reward_rose(train(cfg, tmp_path / method, progress=False))  # the default ink reward


def test_draft_gradient_flows_through_the_last_k_steps_only():
    torch.manual_seed(0)
    task = build_task(_cfg("draft"))
    for p in task.policy.parameters():
        p.data.normal_(0, 0.1)
    grads = {}
    for k in (0, 1, 3):
        task.policy.zero_grad()
        x0, _ = rollout_with_grad(
            task, torch.zeros(4, dtype=torch.long), torch.Generator().manual_seed(1), k
        )
        if k == 0:
            assert not x0.requires_grad
            continue
        task.reward(x0, None).sum().backward()
        grads[k] = task.policy.net[0].weight.grad.clone()
    assert not torch.allclose(grads[1], grads[3])  # more steps, a different gradient


def test_ddpo_ratio_is_one_on_policy_and_the_loss_is_minus_the_mean_advantage():
    torch.manual_seed(0)
    cfg = _cfg("ddpo")
    task = build_task(cfg)
    traj = sample_trajectories(task, 8, torch.Generator().manual_seed(0))
    rewards = task.reward(traj.x0, None)
    buf = ReplayBuffer(16, "on_policy", cfg.num_steps, cfg.gamma)
    buf.add(traj, rewards)
    cells = buf.sample_cells(8, torch.Generator().manual_seed(1))
    params = build_method_params("ddpo", {})
    loss, stats = ddpo_loss(task, cells, cfg, params, torch.Generator())
    adv = per_condition_advantages(cells.reward, cells.cond, cells.reward, cells.cond)
    torch.testing.assert_close(loss, -adv.clamp(-5, 5).mean(), atol=1e-4, rtol=1e-4)
    assert stats["clip_frac"] == 0.0


def test_ddpo_clips_the_ratio_of_per_dimension_likelihoods():
    # DDPO's code averages the log-likelihood over a sample's D dimensions; clip_range is a
    # trust region on that scale. Old log-likelihoods lower by D * delta: ratio exp(delta)
    torch.manual_seed(0)
    cfg = _cfg("ddpo")
    task = build_task(cfg)
    traj = sample_trajectories(task, 8, torch.Generator().manual_seed(0))
    buf = ReplayBuffer(16, "on_policy", cfg.num_steps, cfg.gamma)
    buf.add(traj, task.reward(traj.x0, None))
    cells = buf.sample_cells(8, torch.Generator().manual_seed(1))
    params = build_method_params("ddpo", {})
    adv = per_condition_advantages(cells.reward, cells.cond, cells.reward, cells.cond)
    dims = cells.x_next[0].numel()
    for delta, clipped in ((0.6 * params.clip_range, 0.0), (3 * params.clip_range, 1.0)):
        shifted = dataclasses.replace(cells, logp=cells.logp - dims * delta)
        loss, stats = ddpo_loss(task, shifted, cfg, params, torch.Generator())
        assert stats["clip_frac"] == clipped
        if not clipped:  # inside the trust region the loss is the plain -ratio * A
            expected = -(adv.clamp(-5, 5) * math.exp(delta)).mean()
            torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-4)


def test_per_condition_advantages():
    r = torch.tensor([1.0, 3.0, 10.0, 30.0])
    c = torch.tensor([0, 0, 1, 1])
    adv = per_condition_advantages(r, c, r, c)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]) / 2**0.5)


def test_method_params_and_requirements():
    assert dataclasses.asdict(build_method_params("draft", {"k": 2}))["k"] == 2
    with pytest.raises(ConfigError, match="did you mean 'k'"):
        build_method_params("draft", {"kk": 2})
    with pytest.raises(ConfigError, match="clip_range"):
        build_method_params("ddpo", {"clip_range": 0})
    with pytest.raises(ConfigError, match="needs buffer = 'on_policy'"):
        make_config({"method": "ddpo"})
    # the bounds themselves: what is allowed just inside them, refused just outside
    assert build_method_params("ddpo", {"adv_clip": 0.5}).adv_clip == 0.5
    assert build_method_params("alignprop", {"k_min": 3, "k_max": 3}).k_max == 3
    assert build_method_params("refl", {"min_frac": 0.99}).min_frac == 0.99
    with pytest.raises(ConfigError, match=r"min_frac must be in \[0, 1\), got 1"):
        build_method_params("refl", {"min_frac": 1.0})
    with pytest.raises(ConfigError, match="need 1 <= k_min <= k_max"):
        build_method_params("alignprop", {"k_min": 3, "k_max": 2})
    with pytest.raises(ConfigError, match="k and lv_samples must be >= 1, got 0, 2"):
        build_method_params("draft", {"k": 0, "lv_samples": 2})


def test_a_directly_built_config_meets_the_registries_before_anything_is_written(tmp_path):
    for cfg, match in ((TrainConfig(method="ddpo"), "needs buffer = 'on_policy'"),
                       (TrainConfig(method="ppo"), "unknown method 'ppo'"),
                       (TrainConfig(task="imagenet"), "unknown task 'imagenet'")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            train(cfg, tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()


def test_masked_mean_over_the_marked_cells_or_a_given_count():
    from sqdf.methods.ddpo import masked_mean

    v = torch.tensor([1.0, 2.0, 4.0, 8.0], requires_grad=True)
    keep = torch.tensor([True, False, True, False])
    assert float(masked_mean(v, keep)) == 2.5 and float(masked_mean(v, None)) == 3.75
    assert float(masked_mean(v, keep, count=10)) == 0.5  # an update's kept cells, not this batch's
    none = torch.zeros(4, dtype=torch.bool)
    for count in (None, 0):  # nothing kept: 0, still differentiable (no 0 / 0)
        out = masked_mean(v, none, count)
        assert float(out) == 0.0
        (grad,) = torch.autograd.grad(out, v)
        assert torch.equal(grad, torch.zeros(4))
