"""GRPO's Flow-GRPO parity options against independent computations: a numpy re-implementation
of Flow-GRPO's PerPromptStatTracker (flow_grpo/stat_tracking.py lines 11-31, at ac4c86e), the
cells its inner epoch visits (scripts/train_sd3.py lines 345, 827-864), the mean without
zero-advantage samples (lines 796-817) and its KL (line 895)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from sqdf.methods import build_method_params
from sqdf.methods.grpo import group_advantages, grpo_loss, trained_steps
from sqdf.run.settings import make_config
from sqdf.sampling.buffer import ReplayBuffer
from sqdf.sampling.sampler import sample_trajectories, step_mean_std
from sqdf.tasks import build_task
from sqdf.training.grouped_cells import CellSchedule, buffer_cells, gather_newest

BASE = dict(task="gmm2d", method="grpo", buffer="on_policy", num_steps=5, steps=3, batch_size=8,
            buffer_size=16, log_every=1, checkpoint_every=0, device="cpu", estimator="tweedie",
            task_params={"hidden": 8, "process": "flow"}, lr=1e-2)  # fmt: skip


def their_advantages(prompts, rewards, global_std):
    """PerPromptStatTracker(global_std).update(prompts, rewards) for type 'grpo', after a
    clear(): per prompt, (r - mean) / (np.std + 1e-4), the std the whole batch's if global."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    advantages = np.empty_like(rewards)
    for prompt in np.unique(prompts):
        mine = rewards[prompts == prompt]
        std = (np.std(rewards) if global_std else np.std(mine)) + 1e-4
        advantages[prompts == prompt] = (mine - np.mean(mine)) / std
    return advantages


@pytest.mark.parametrize("global_std", [False, True])
def test_population_std_advantages_are_flow_grpos_stat_tracker(global_std):
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 5, 40)
    prompts[:3] = 7  # a constant group: advantage 0, not blown up to unit scale
    prompts[3] = 9  # a group of one
    rewards = rng.normal(size=40) * rng.uniform(0.01, 3, 40)
    rewards[:3] = 0.25
    expected = their_advantages(prompts, rewards, global_std)
    cond = torch.from_numpy(prompts)
    r = torch.from_numpy(rewards)
    got = group_advantages(r, cond, r, cond, std="population", global_std=global_std)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert not got[:4].any()
    # today's default differs: the unbiased std, a constant group floored at 1e-6
    default = group_advantages(r, cond, r, cond)
    assert not np.allclose(default.numpy(), expected)


def _task():
    cfg = make_config(BASE)
    torch.manual_seed(0)
    task = build_task(cfg)
    for p in task.policy.parameters():
        p.data.normal_(0, 0.3)
    return cfg, task


def _buffer(task, cfg, rewards, cond=None):
    buf = ReplayBuffer(16, "on_policy", cfg.num_steps, cfg.gamma)
    buf.add(sample_trajectories(task, len(rewards), torch.Generator().manual_seed(0)), rewards)
    if cond is not None:
        buf.cond[buf.newest] = cond.to(buf.cond.dtype)
    return buf


def test_grouping_by_condition_merges_blocks_of_one_condition():
    cfg, task = _task()
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 10.0, 10.0, 20.0, 40.0])
    cond = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0])  # not the blocks of G = 4
    buf = _buffer(task, cfg, rewards, cond)
    cells = buf.sample_cells(16, torch.Generator().manual_seed(1))
    params = build_method_params("grpo", {"group_by": "condition", "std": "population"})
    groups = gather_newest(buf, params).cell_groups(buf, cells)
    adv = group_advantages(cells.reward, groups["group"], groups["batch_reward"],
                           groups["batch_group"], std="population")  # fmt: skip
    expected = their_advantages(cond.tolist(), rewards.tolist(), global_std=False)
    position = {int(s): i for i, s in enumerate(buf.newest)}
    want = torch.tensor([expected[position[int(s)]] for s in cells.index])
    torch.testing.assert_close(adv.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fraction", [1.0, 0.99, 0.5])
def test_sweep_visits_each_trained_step_of_each_trajectory_once_a_pass(fraction):
    cfg, task = _task()
    buf = _buffer(task, cfg, torch.arange(8.0))
    params = build_method_params("grpo", {"cell_order": "sweep", "timestep_fraction": fraction})
    steps = int(cfg.num_steps * fraction)  # Flow-GRPO's num_train_timesteps
    assert trained_steps(cfg.num_steps, fraction) == steps
    schedule, g = CellSchedule(), torch.Generator().manual_seed(0)
    seen = [schedule.draw(buf, 4, params, g) for _ in range(2 * 8 * steps // 4)]
    pairs = [(int(i), int(k)) for c in seen for i, k in zip(c.index, c.step, strict=True)]
    every = {(int(i), k) for i in buf.newest for k in range(steps)}
    first, second = pairs[: len(every)], pairs[len(every) :]
    assert sorted(first) == sorted(every) and sorted(second) == sorted(every)
    # a trajectory's steps come together, in order, as Flow-GRPO's loop over j
    for i in range(0, len(first), steps):
        assert [k for _, k in first[i : i + steps]] == list(range(steps))
        assert len({s for s, _ in first[i : i + steps]}) == 1
    # the cells are the buffer's states at those steps
    c = seen[0]
    states = buf.states
    torch.testing.assert_close(c.x_t, states[c.index, c.step])
    torch.testing.assert_close(c.x_next, states[c.index, c.step + 1])
    schedule.new_batch()
    assert schedule.queue.shape[0] == 0


def test_random_order_with_a_fraction_never_draws_the_skipped_steps():
    cfg, task = _task()
    buf = _buffer(task, cfg, torch.arange(8.0))
    params = build_method_params("grpo", {"timestep_fraction": 0.99})
    cells = CellSchedule().draw(buf, 400, params, torch.Generator().manual_seed(0))
    assert set(cells.step.tolist()) == set(range(cfg.num_steps - 1))
    assert CellSchedule.needed(params)
    assert not CellSchedule.needed(build_method_params("grpo", {}))


def _sde_sigma(t, t1, a):
    """Flow-GRPO's std_dev_t (sd3_sde_with_logprob.py line 47)."""
    return np.sqrt(t / (1 - (t1 if t == 1 else t))) * a


def test_zero_advantage_cells_leave_the_mean_and_the_kl_and_beta_is_flow_grpos():
    cfg, task = _task()
    rewards = torch.tensor([5.0, 5.0, 5.0, 5.0, 1.0, 2.0, 4.0, 8.0])  # group 0: all equal
    buf = _buffer(task, cfg, rewards)
    cells = buf.sample_cells(24, torch.Generator().manual_seed(2))
    beta = 0.3
    params = build_method_params("grpo", {"std": "population", "drop_zero_advantage": True,
                                          "beta": beta, "kl_scale": "flow_grpo"})  # fmt: skip
    loss, _ = grpo_loss(task, cells, cfg, params, torch.Generator(),
                        **gather_newest(buf, params).cell_groups(buf, cells))  # fmt: skip
    # independently: at ratio 1 the policy loss is -mean(A) over the kept cells, and the KL is
    # Flow-GRPO's mean_d (μ_θ - μ_ref)² / (2 σ_t²), averaged over the kept cells
    block = [0, 0, 0, 0, 1, 1, 1, 1]
    adv = their_advantages(block, rewards.tolist(), global_std=False)
    position = {int(s): i for i, s in enumerate(buf.newest)}
    cell_adv = np.array([adv[position[int(s)]] for s in cells.index])
    kept = cell_adv != 0
    assert 0 < kept.sum() < len(kept)
    mean, _ = step_mean_std(task, cells.x_t, cells.step, cells.cond, policy=True)
    ref, _ = step_mean_std(task, cells.x_t, cells.step, cells.cond, policy=False)
    grid = task.kernel.sigmas.double().numpy()
    sigma_t = np.array([_sde_sigma(grid[k], grid[1], 0.7) for k in cells.step.tolist()])
    kl = ((mean - ref) ** 2).detach().double().numpy().mean(axis=1) / (2 * sigma_t**2)
    assert kl[kept].mean() > 1e-4
    expected = -cell_adv[kept].mean() + beta * kl[kept].mean()
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_a_batch_of_zero_advantages_gives_a_zero_loss_that_still_back_propagates():
    cfg, task = _task()
    buf = _buffer(task, cfg, torch.full((8,), 3.0))
    cells = buf.sample_cells(8, torch.Generator().manual_seed(3))
    params = build_method_params("grpo", {"drop_zero_advantage": True, "beta": 0.1})
    loss, _ = grpo_loss(task, cells, cfg, params, torch.Generator(),
                        **gather_newest(buf, params).cell_groups(buf, cells))  # fmt: skip
    assert float(loss) == 0.0
    loss.backward()


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"std": "biased"}, "unknown std 'biased'; known: sample, population"),
        ({"group_by": "prompt"}, "unknown group_by 'prompt'; known: block, condition"),
        ({"cell_order": "epoch"}, "unknown cell_order 'epoch'; known: random, sweep"),
        ({"kl_scale": "avg"}, "unknown kl_scale 'avg'; known: sum, mean, half_mean, flow_grpo"),
        ({"timestep_fraction": 0}, r"timestep_fraction must be in \(0, 1\], got 0"),
        ({"timestep_fraction": 1.5}, r"timestep_fraction must be in \(0, 1\], got 1.5"),
    ],
)
def test_bad_parity_params_are_one_clear_error(params, match):
    from sqdf.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        build_method_params("grpo", params)


@pytest.mark.parametrize("group_by", ["condition", "block"])
def test_groups_and_global_std_span_processes(group_by, tmp_path):
    # two real processes (torchrun, gloo) with batches of different lengths
    from tests.distributed.grouped_gather import batch
    from tests.test_distributed import ROOT, launch

    launch([str(ROOT / "tests/distributed/grouped_gather.py"), str(tmp_path), group_by])
    got = [v for r in (0, 1) for v in json.loads((tmp_path / f"{r}.json").read_text())]
    (c0, r0), (c1, r1) = batch(0), batch(1)
    if group_by == "condition":  # the prompt's samples on both processes form one group
        prompts = c0 + c1
    else:  # blocks of 2 on each process, apart
        prompts = [f"0-{i // 2}" for i in range(len(c0))] + [f"1-{i // 2}" for i in range(len(c1))]
    expected = their_advantages(prompts, r0 + r1, global_std=True)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_the_run_says_how_flow_grpos_beta_weights_each_step():
    from sqdf.methods.grpo import beta_note

    _, task = _task()
    params = build_method_params("grpo", {"beta": 0.01, "kl_scale": "flow_grpo"})
    grid = task.kernel.sigmas.double()
    each = ", ".join(f"{float(w):.3g}" for w in 0.01 * (grid[:-1] - grid[1:]) / 2)
    assert beta_note(task, params) == (
        "grpo beta 0.01 (kl_scale flow_grpo) weights the exact KL summed over D = 2 dimensions "
        f"by {each} at steps 0..4"
    )
    assert beta_note(task, build_method_params("grpo", {"beta": 0.01})) is None


def test_a_process_that_leaves_its_micro_batches_early_does_not_hang_the_gathers(tmp_path):
    # global_std and condition groups gather the newest batch over processes: once an update
    # on every process, not per micro-batch (process 1's non-finite loss stops its
    # micro-batches after the first, process 0 runs three)
    from tests.test_distributed import ROOT, launch

    launch([str(ROOT / "tests/distributed/grouped_skip.py"), str(tmp_path)])
    counts = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    # per update, on both: the rewards and the groups, once each
    assert counts[0] == counts[1] == {"gathers": 2 * counts[0]["steps"], "steps": 3}


@pytest.mark.parametrize(("std", "global_std"), [("sample", False), ("population", False),
                                                 ("population", True)])  # fmt: skip
def test_constant_groups_get_advantage_exactly_zero(std, global_std):
    # values like -2.678 are not representable: a float32 mean of 24 copies is often not the
    # value itself, and drop_zero_advantage would keep the group with tiny nonzero advantages
    rng = np.random.default_rng(0)
    constants = torch.from_numpy(rng.uniform(-5, 5, 500)).float()
    rewards = constants.repeat_interleave(24)
    rewards[:24] = torch.linspace(0, 1, 24)  # one group that does vary
    group = torch.arange(500).repeat_interleave(24)
    adv = group_advantages(rewards, group, rewards, group, std=std, global_std=global_std)
    assert not adv[24:].any()
    assert adv.dtype == torch.float64
    assert adv[:24].abs().min() > 0
    # float64, as Flow-GRPO's numpy: the varying group's advantages to rounding
    r = rewards[:24].double().numpy()
    spread = {"sample": np.std(r, ddof=1), "population": np.std(r) + 1e-4}[std]
    if global_std:
        spread = np.std(rewards.double().numpy()) + 1e-4
    np.testing.assert_allclose(adv[:24].numpy(), (r - r.mean()) / spread, rtol=1e-12)


def test_dropped_zero_advantages_leave_every_kept_cell_of_the_update_the_same_weight():
    # Flow-GRPO filters the zero-advantage samples out before it batches: each kept cell of
    # the update weighs 1 / (kept cells of the update), whatever its micro-batch kept
    from types import SimpleNamespace

    from sqdf.training.gradients import planned_cells

    cfg, task = _task()
    rewards = torch.tensor([2.0] * 4 + [1.0, 2.0, 4.0, 8.0] + [7.0] * 4 + [0.0, 3.0, 1.0, 5.0])
    buf = _buffer(task, cfg, rewards)
    params = build_method_params("grpo", {"std": "population", "drop_zero_advantage": True})
    accum = 4
    s = SimpleNamespace(cfg=SimpleNamespace(batch_size=5, grad_accum=accum), method_params=params,
                        cell_schedule=CellSchedule(), buffer=buf,
                        generator=torch.Generator().manual_seed(4))  # fmt: skip
    newest = gather_newest(buf, params)
    plan = planned_cells(s, newest)
    total = 0.0
    for position, step in plan.cells:
        cells = buffer_cells(buf, buf.newest[position], step)
        loss, _ = grpo_loss(task, cells, cfg, params, torch.Generator(), kept_cells=plan.kept,
                            **newest.cell_groups(buf, cells))  # fmt: skip
        total += float(loss.detach()) / accum  # as the trainer accumulates
    # independently: at ratio 1 the loss is -A; the update's mean over its kept cells
    adv = their_advantages([i // 4 for i in range(16)], rewards.tolist(), global_std=False)
    cell_adv = [adv[int(p)] for position, _ in plan.cells for p in position]
    kept = [a for a in cell_adv if a != 0]
    assert total == pytest.approx(-sum(kept) / len(kept), rel=1e-5, abs=1e-6)
    # micro-batches kept different numbers of cells, so the mean of their means differs
    per_batch = [[adv[int(p)] for p in position if adv[int(p)] != 0] for position, _ in plan.cells]
    assert len({len(b) for b in per_batch}) > 1
    mean_of_means = sum(-sum(b) / max(len(b), 1) for b in per_batch) / accum
    assert abs(mean_of_means - total) > 1e-3


def test_the_gradient_phase_takes_the_planned_cells_and_weighs_each_kept_cell_the_same():
    # accumulate_gradients with a plan (drop_zero_advantage): its loss is the update's mean of
    # -A over the kept cells of the planned micro-batches, from the run's generator alone
    import dataclasses
    from types import SimpleNamespace

    from sqdf.infra.distributed import Processes
    from sqdf.training.gradients import accumulate_gradients, planned_cells
    from sqdf.training.state import Fresh

    cfg, task = _task()
    cfg = dataclasses.replace(cfg, batch_size=5, grad_accum=4)
    rewards = torch.tensor([2.0] * 4 + [1.0, 2.0, 4.0, 8.0] + [7.0] * 4 + [0.0, 3.0, 1.0, 5.0])
    buf = _buffer(task, cfg, rewards)
    params = build_method_params("grpo", {"std": "population", "drop_zero_advantage": True})

    def run():
        return SimpleNamespace(
            cfg=cfg, method_params=params, cell_schedule=CellSchedule(), buffer=buf, task=task,
            generator=torch.Generator().manual_seed(4), procs=Processes("cpu"), scaler=None,
            phase="", optimizer=SimpleNamespace(zero_grad=task.policy.zero_grad),
        )  # fmt: skip

    # the cells from the config alone: cell_order random draws, per micro-batch, batch_size
    # positions in the newest 16 trajectories, then their steps in 0..T-1 (timestep_fraction
    # 1), from the run's generator; grad_accum micro-batches
    g = torch.Generator().manual_seed(4)
    drawn = []
    for _ in range(cfg.grad_accum):
        drawn.append(torch.randint(0, 16, (cfg.batch_size,), generator=g))
        torch.randint(0, cfg.num_steps, (cfg.batch_size,), generator=g)
    plan = planned_cells(run(), gather_newest(buf, params))
    assert [position.tolist() for position, _ in plan.cells] == [d.tolist() for d in drawn]
    state = torch.get_rng_state()
    grads = accumulate_gradients(run(), Fresh())
    assert torch.equal(torch.get_rng_state(), state)  # the plan drew from the run's generator
    adv = their_advantages([i // 4 for i in range(16)], rewards.tolist(), global_std=False)
    kept = [adv[int(p)] for position in drawn for p in position if adv[int(p)] != 0]
    assert grads.loss == pytest.approx(-sum(kept) / len(kept), rel=1e-5, abs=1e-6)
    assert 0 < grads.stats["kl_mean"] < 10  # the micro-batches' mean KL (policy != reference)


def test_a_sweep_that_cannot_finish_a_pass_is_said_and_the_preset_can():
    from sqdf.methods.grpo import sweep_note

    sweep = build_method_params("grpo", {"cell_order": "sweep", "timestep_fraction": 0.99})
    cfg = make_config(dict(BASE, num_steps=10, batch_size=8, grad_accum=9, fresh_trajectories=8))
    assert sweep_note(cfg, 10, sweep) is None  # 8 x 9 cells, 8 x 9 trained: one pass
    short = make_config(dict(BASE, num_steps=10, batch_size=8, grad_accum=8,
                             fresh_trajectories=8))  # fmt: skip
    assert sweep_note(short, 10, sweep) == (
        "grpo cell_order sweep: a fresh batch has 72 trained cells (8 trajectories x 9 steps), "
        "more than the 64 (batch_size x grad_accum x replay_ratio) trained before the next "
        "batch: a pass never finishes"
    )
    assert sweep_note(short, 10, build_method_params("grpo", {})) is None


def test_the_presets_global_std_on_fewer_processes_than_its_notes_is_said(tmp_path):
    from sqdf.run.settings import load_preset, preset_processes_note, resolve_settings

    name = "flow-grpo-sd35-pickscore"
    (tmp_path / "p.txt").write_text("a cat\n")
    sources = resolve_settings(flags={"task_params": {"prompts": str(tmp_path / "p.txt")}},
                               preset=name).sources  # fmt: skip
    assert load_preset(name).processes == 12  # 12 x 48 = Flow-GRPO's 576 an update
    assert "1152" in load_preset(name).notes  # their std's samples, an epoch
    assert preset_processes_note(sources, 1) == (
        f"preset {name}: global_std spans the batches of the processes, 1 here and 12 in its "
        "notes: a std over fewer samples (sqdf presets shows the notes)"
    )
    assert preset_processes_note(sources, 12) is None
    assert preset_processes_note({"method_params.global_std": "flag"}, 1) is None


@pytest.mark.parametrize("global_std", [False, True])
def test_sample_std_advantages_are_per_group_or_over_the_batch(global_std):
    r = torch.tensor([1.0, 2.0, 4.0, 10.0, 20.0, 40.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(r, g, r, g, std="sample", global_std=global_std)
    x = r.double().numpy()
    for k in (0, 1):
        mine = x[3 * k : 3 * k + 3]
        spread = np.std(x, ddof=1) if global_std else np.std(mine, ddof=1)
        np.testing.assert_allclose(adv[3 * k : 3 * k + 3].numpy(), (mine - mine.mean()) / spread,
                                   rtol=1e-12)  # fmt: skip


def test_the_kl_term_of_dropped_zero_advantages_is_over_the_updates_kept_cells_too():
    # with drop_zero_advantage both terms of the loss are sums over the kept cells divided by
    # the update's kept cells: twice as many kept cells in the update, half the loss
    cfg, task = _task()
    rewards = torch.tensor([2.0] * 4 + [1.0, 2.0, 4.0, 8.0])
    buf = _buffer(task, cfg, rewards)
    params = build_method_params("grpo", {"drop_zero_advantage": True, "beta": 0.5})
    newest = gather_newest(buf, params)
    cells = buffer_cells(buf, buf.newest[torch.arange(8)], torch.tensor([0, 1, 2, 3] * 2))
    loss, kl = [], []
    for kept in (3.0, 6.0):
        out, stats = grpo_loss(task, cells, cfg, params, torch.Generator(), kept_cells=kept,
                               **newest.cell_groups(buf, cells))  # fmt: skip
        loss.append(float(out.detach()))
        kl.append(stats["kl_mean"])
    assert kl[0] > 1e-3  # the policy is not the reference: the KL term is there
    assert loss[1] == pytest.approx(loss[0] / 2, rel=1e-6)


def test_only_a_sweep_over_a_shared_buffer_is_refused():
    from sqdf.errors import ConfigError
    from sqdf.methods.grpo import check_buffer_scope

    cfg = make_config(BASE)
    for scope, order in (("process", "sweep"), ("shared", "random"), ("process", "random")):
        params = build_method_params("grpo", {"cell_order": order})
        check_buffer_scope(dataclasses.replace(cfg, buffer_scope=scope), params)
    with pytest.raises(ConfigError, match="cell_order sweep with buffer_scope shared"):
        check_buffer_scope(
            dataclasses.replace(cfg, buffer_scope="shared"),
            build_method_params("grpo", {"cell_order": "sweep"}),
        )


@pytest.mark.parametrize("std", ["sample", "population"])
def test_a_constant_group_whose_float64_mean_is_not_its_value_gets_zero(std):
    # sum([0.1] * 3) / 3 is 0.10000000000000002 in float64: without the check, a tiny
    # nonzero advantage (divided by the floored std) that drop_zero_advantage would keep
    r = torch.tensor([0.1, 0.1, 0.1, 1.0, 2.0, 4.0], dtype=torch.float64)
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    assert float(r[:3].mean()) != 0.1
    adv = group_advantages(r, g, r, g, std=std)
    assert not adv[:3].any() and adv[3:].all()
