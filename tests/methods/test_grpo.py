"""GRPO: advantages normalised within each group of the newest batch, DDPO's clipped ratio
(its gradient at ratio 1 is the plain policy gradient), an exact KL penalty, and a trainer
that samples G copies of each condition."""

import pytest
import torch
from safetensors.torch import load_file

from sqdf import read_metrics
from sqdf.core.kl import gaussian_log_prob
from sqdf.errors import ConfigError
from sqdf.infra.distributed import rank_seed
from sqdf.methods import build_method_params
from sqdf.methods.grpo import grpo_loss
from sqdf.run.settings import make_config
from sqdf.sampling.buffer import ReplayBuffer
from sqdf.sampling.sampler import sample_trajectories, step_mean_std
from sqdf.tasks import build_task
from sqdf.training.fresh import whole_groups
from sqdf.training.grouped_cells import gather_newest
from sqdf.training.state import TrainState
from sqdf.training.trainer import train

# tiny gmm2d settings, as tests/test_compare.py's BASE
BASE = dict(task="gmm2d", method="grpo", buffer="on_policy", num_steps=5, steps=3, batch_size=8,
            buffer_size=16, log_every=1, checkpoint_every=0, device="cpu", estimator="tweedie",
            task_params={"hidden": 8}, lr=1e-2)  # fmt: skip
G = 4  # the default group size: two groups in a batch of 8


def _hand_advantages(rewards: list[float]) -> torch.Tensor:
    """(r - mean) / sample std of one group, in plain Python."""
    n = len(rewards)
    mean = sum(rewards) / n
    std = (sum((r - mean) ** 2 for r in rewards) / (n - 1)) ** 0.5
    return torch.tensor([(r - mean) / std for r in rewards])


def _randomised_task():
    """The gmm2d task with a policy that differs from the reference (its output layer starts
    at zero), so that likelihoods, gradients and the KL are not trivial."""
    cfg = make_config(BASE)
    torch.manual_seed(0)
    task = build_task(cfg)
    for p in task.policy.parameters():
        p.data.normal_(0, 0.3)
    return cfg, task


def _grouped_cells(task, cfg, rewards: torch.Tensor, n_cells: int = 32):
    """The on-policy buffer after two batches (the newest wraps around its end), cells of the
    newest, and what the trainer tells the loss about their groups."""
    buf = ReplayBuffer(12, "on_policy", cfg.num_steps, cfg.gamma)
    g = torch.Generator().manual_seed(0)
    buf.add(sample_trajectories(task, 8, g), torch.zeros(8))  # the newest lands in 8..11, 0..3
    buf.add(sample_trajectories(task, 8, g), rewards)
    cells = buf.sample_cells(n_cells, torch.Generator().manual_seed(1))
    return cells, gather_newest(buf, build_method_params("grpo", {})).cell_groups(buf, cells)


def test_advantages_are_standardised_within_each_group_of_the_newest_batch():
    cfg, task = _randomised_task()
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 10.0, 10.0, 20.0, 40.0])
    # fewer cells than trajectories: the statistics are the whole batch's, not the cells'
    cells, groups = _grouped_cells(task, cfg, rewards, n_cells=5)
    expected = torch.cat([_hand_advantages([1, 2, 3, 6]), _hand_advantages([10, 10, 20, 40])])
    torch.testing.assert_close(groups["batch_reward"], rewards.double())  # float64
    torch.testing.assert_close(groups["batch_group"], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    # each cell's group is its trajectory's position in the newest batch // G
    position = {int(slot): i for i, slot in enumerate([8, 9, 10, 11, 0, 1, 2, 3])}
    for slot, group in zip(cells.index.tolist(), groups["group"].tolist(), strict=True):
        assert group == position[slot] // G
    for k in (0, 1):  # the hand computation is zero-mean and unit-std in each group
        a = expected[4 * k : 4 * k + 4]
        assert abs(float(a.mean())) < 1e-6 and abs(float(a.std()) - 1) < 1e-6
    # at ratio 1 (the policy that sampled them) the loss is -mean(A) over the cells
    params = build_method_params("grpo", {})
    loss, stats = grpo_loss(task, cells, cfg, params, torch.Generator(), **groups)
    cell_adv = torch.stack([expected[position[int(s)]] for s in cells.index])
    torch.testing.assert_close(loss, -cell_adv.mean(), atol=1e-5, rtol=1e-5)
    assert stats["clip_frac"] == 0.0


def test_advantages_are_clipped():
    cfg, task = _randomised_task()
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0])  # A = ±1.5 at the outlier
    cells, groups = _grouped_cells(task, cfg, rewards)
    params = build_method_params("grpo", {"adv_clip": 1.0})
    loss, _ = grpo_loss(task, cells, cfg, params, torch.Generator(), **groups)
    outlier = [1.0 if s == 11 else -1.0 if s == 3 else -0.5 if s in (8, 9, 10) else 0.5
               for s in cells.index.tolist()]  # fmt: skip
    torch.testing.assert_close(loss, -torch.tensor(outlier).mean(), atol=1e-5, rtol=1e-5)


def test_gradient_at_ratio_one_is_the_policy_gradient_over_d():
    # d/dθ exp((log p_θ - log p_old) / D) = (d log p_θ / dθ) / D at p_θ = p_old: the clipped
    # surrogate's gradient is -mean(A · d log p_θ / dθ) / D, computed here directly
    cfg, task = _randomised_task()
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 10.0, 10.0, 20.0, 40.0])
    cells, groups = _grouped_cells(task, cfg, rewards)
    params = build_method_params("grpo", {})
    weights = [p for p in task.policy.parameters() if p.requires_grad]
    loss, _ = grpo_loss(task, cells, cfg, params, torch.Generator(), **groups)
    got = torch.autograd.grad(loss, weights)
    mean, std = step_mean_std(task, cells.x_t, cells.step, cells.cond, policy=True)
    logp = gaussian_log_prob(cells.x_next, mean, std)
    adv = torch.cat([_hand_advantages([1, 2, 3, 6]), _hand_advantages([10, 10, 20, 40])])
    position = {s: i for i, s in enumerate([8, 9, 10, 11, 0, 1, 2, 3])}
    cell_adv = torch.stack([adv[position[int(s)]] for s in cells.index])
    dims = cells.x_next[0].numel()
    direct = torch.autograd.grad(-(cell_adv * logp).mean() / dims, weights)
    assert any(float(d.abs().max()) > 1e-4 for d in direct)  # not trivially zero
    for a, b in zip(got, direct, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_beta_adds_exactly_beta_times_the_exact_kl():
    cfg, task = _randomised_task()
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 10.0, 10.0, 20.0, 40.0])
    cells, groups = _grouped_cells(task, cfg, rewards)
    plain, stats = grpo_loss(task, cells, cfg, build_method_params("grpo", {}), torch.Generator(),
                             **groups)  # fmt: skip
    beta = 0.37
    with_kl, _ = grpo_loss(task, cells, cfg, build_method_params("grpo", {"beta": beta}),
                           torch.Generator(), **groups)  # fmt: skip
    # KL(N(m_p, s²I) || N(m_q, s²I)) = sum over dimensions of (m_p - m_q)² / (2 s²)
    mean, std = step_mean_std(task, cells.x_t, cells.step, cells.cond, policy=True)
    ref, _ = step_mean_std(task, cells.x_t, cells.step, cells.cond, policy=False)
    kl = ((mean - ref) ** 2 / (2 * std**2)).sum(dim=1).detach()
    assert float(kl.mean()) > 1e-3  # the randomised policy is away from the reference
    torch.testing.assert_close(with_kl - plain, beta * kl.mean(), atol=1e-6, rtol=1e-5)
    assert stats["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-5)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"group_size": 1}, "group_size must be >= 2, got 1"),
        ({"group_size": 2.5}, "group_size must be a whole number, got 2.5"),
        ({"clip_range": 0}, "clip_range must be > 0, got 0"),
        ({"adv_clip": -1.0}, r"adv_clip must be > 0, got -1.0"),
        ({"beta": -0.1}, r"beta must be >= 0, got -0.1"),
        ({"groupsize": 4}, "unknown parameter 'groupsize'.*did you mean 'group_size'"),
    ],
)
def test_bad_params_are_one_clear_error(params, match):
    with pytest.raises(ConfigError, match=match):
        build_method_params("grpo", params)


def test_config_refuses_groups_that_do_not_fit_the_batch_and_a_replay_buffer():
    with pytest.raises(ConfigError, match="group_size 3 .* must divide batch_size 8"):
        make_config({**BASE, "method_params": {"group_size": 3}})
    with pytest.raises(ConfigError, match="needs buffer = 'on_policy'"):
        make_config({**BASE, "buffer": "uniform"})
    make_config({**BASE, "method_params": {"group_size": 8}})  # one group of the whole batch


def test_only_whole_groups_of_finite_rewards_are_stored(tmp_path):
    finite = torch.tensor([True, True, False, True, True, True, True, True])
    torch.testing.assert_close(whole_groups(finite, 4), torch.tensor([4, 5, 6, 7]))
    torch.testing.assert_close(whole_groups(finite, 1), finite.nonzero().squeeze(1))  # as before
    # a batch sampled and scored by the caller has no groups: refused, not misread
    cfg, task = _randomised_task()
    traj = sample_trajectories(task, 8, torch.Generator().manual_seed(0))
    state = TrainState(task=task, fresh=(traj, torch.zeros(8)))
    with pytest.raises(ValueError, match="grpo samples its own groups"):
        train(cfg, tmp_path / "run", progress=False, state=state)


@pytest.mark.parametrize("process", ["vp", "flow"])
def test_three_updates_on_gmm2d_change_the_policy(process, tmp_path):
    cfg = make_config({**BASE, "task_params": {"hidden": 8, "process": process}})
    run = train(cfg, tmp_path / process, progress=False)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["skipped_updates"] == 0
    assert all(r["grad_norm"] > 0 for r in rows)
    torch.manual_seed(cfg.seed)
    start = build_task(cfg).policy.state_dict()
    final = load_file(str(run / "final" / "policy.safetensors"))
    assert any(not torch.equal(final[k], start[k]) for k in start)


def test_the_trainer_samples_g_copies_of_each_condition_on_digits(tmp_path):
    values = dict(task="digits", method="grpo", buffer="on_policy", num_steps=3, steps=1,
                  batch_size=6, buffer_size=6, checkpoint_every=0, device="cpu",
                  estimator="tweedie", method_params={"group_size": 2},
                  task_params={"classes": [1, 4, 7]})  # fmt: skip
    cfg = make_config(values)
    torch.manual_seed(cfg.seed)
    state = TrainState(task=build_task(cfg))
    train(cfg, tmp_path / "digits", progress=False, state=state)
    cond = state.buffer.cond[state.buffer.newest]
    # the run's stream drew batch_size / G = 3 conditions, the first thing it drew
    g = torch.Generator().manual_seed(rank_seed(cfg.seed, 0))
    drawn = state.task.sample_conditions(3, g)
    torch.testing.assert_close(cond, drawn.repeat_interleave(2))
    # a method without groups draws as before: one condition per sample, by the sampler
    del values["method_params"]
    cfg = make_config({**values, "method": "ddpo"})
    state = TrainState(task=state.task)
    train(cfg, tmp_path / "ddpo", progress=False, state=state)
    g = torch.Generator().manual_seed(rank_seed(cfg.seed, 0))
    cond = state.buffer.cond[state.buffer.newest]
    torch.testing.assert_close(cond, state.task.sample_conditions(6, g))
