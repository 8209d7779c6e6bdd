"""The training loop: run folder contents, determinism, and resume."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sqdf import SqdfError, TrainConfig, evaluate_run, read_metrics, sample_run, train
from sqdf.infra.checkpoint import list_checkpoints
from tests.learning import assert_reward_rose

METRIC_KEYS = {
    "step",
    "loss",
    "reward_mean",
    "reward_std",
    "kl_mean",
    "grad_norm",
    "lr",
    "samples_seen",
    "wall_s",
    "sample_s",
}


def test_run_folder_contents(tiny_config, tmp_path):
    run = train(tiny_config, tmp_path / "run", progress=False)
    doc = json.loads((run / "config.json").read_text())
    assert doc["format"] == "sqdf-run" and doc["train"]["steps"] == 6
    assert doc["resolved"]["reward_params"] == {"b": [1.0, 0.0]}
    assert doc["resolved"]["task_params"]["num_modes"] == 8
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert METRIC_KEYS <= set(rows[0])
    assert rows[-1]["samples_seen"] == 6 * tiny_config.batch_size
    # the sampling share of the wall time: grows each update, never above the whole
    assert 0 < rows[0]["sample_s"] < rows[1]["sample_s"] < rows[2]["sample_s"]
    assert all(r["sample_s"] < r["wall_s"] for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [
        "step_0000003",
        "step_0000006",
    ]
    weights = load_file(str(run / "final" / "policy.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def test_training_changes_the_policy_and_is_deterministic(tiny_config, tmp_path):
    a = train(tiny_config, tmp_path / "a", progress=False)
    b = train(tiny_config, tmp_path / "b", progress=False)
    wa, wb = (load_file(str(r / "final" / "policy.safetensors")) for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(float(v.abs().max()) > 0 for k, v in wa.items() if k.startswith("net.4"))


@pytest.mark.parametrize("buffer", ["uniform", "prioritized", "on_policy"])
def test_resume_gives_the_uninterrupted_result(tiny_config, tmp_path, buffer):
    cfg = dataclasses.replace(tiny_config, buffer=buffer, replay_ratio=2)
    straight = train(cfg, tmp_path / "straight", progress=False)
    half = dataclasses.replace(cfg, steps=3)
    train(half, tmp_path / "resumed", progress=False)
    resumed = train(cfg, tmp_path / "resumed", resume=True, progress=False)
    ws, wr = (load_file(str(r / "final" / "policy.safetensors")) for r in (straight, resumed))
    assert all(torch.equal(ws[k], wr[k]) for k in ws)
    rows_s, rows_r = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in rows_r] == [r["step"] for r in rows_s]
    assert [r["loss"] for r in rows_r] == [r["loss"] for r in rows_s]


def test_refuses_to_overwrite_or_resume_a_different_config(tiny_config, tmp_path):
    run = train(tiny_config, tmp_path / "run", progress=False)
    with pytest.raises(SqdfError, match="already exists"):
        train(tiny_config, run, progress=False)
    with pytest.raises(SqdfError, match="alpha"):
        train(dataclasses.replace(tiny_config, alpha=0.5), run, resume=True, progress=False)


def test_eval_and_sample(tiny_config, tmp_path):
    run = train(tiny_config, tmp_path / "run", progress=False)
    metrics = evaluate_run(run, num_samples=256)
    for key in (
        "reward_mean",
        "kl_path",
        "target_mode_tv",
        "target_sliced_w2",
        "ref_target_mode_tv",
        "ref_target_sliced_w2",
    ):
        assert isinstance(metrics[key], float) and metrics[key] == metrics[key]
    assert metrics["kl_path"] > 0
    # the evaluation scores the trained policy, which has learned: the reward rose
    assert_reward_rose(run)
    assert metrics["reward_mean"] > metrics["ref_reward_mean"]  # same noise for both
    assert json.loads((run / "eval.json").read_text()) == metrics
    picture = sample_run(run, num_samples=64, out=tmp_path / "pics" / "s.png")
    assert picture.stat().st_size > 1000
    assert load_file(str(picture.with_suffix(".safetensors")))["samples"].shape == (64, 2)


def test_resume_with_another_log_every_keeps_the_rows_logged_so_far(tiny_config, tmp_path):
    cfg = dataclasses.replace(tiny_config, steps=4, log_every=1, checkpoint_every=4)
    run = train(cfg, tmp_path / "run", progress=False)
    train(dataclasses.replace(cfg, steps=6, log_every=2), run, resume=True, progress=False)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 6]


def _diffusers_rates(make, steps: int, lr: float, **kw) -> list[float]:
    """The rate of each of ``steps`` optimizer steps under a diffusers scheduler."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = make(optimizer, **kw)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_lr_schedules_are_diffusers_own_with_their_closed_form_values(tiny_config):
    from diffusers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_polynomial_decay_schedule_with_warmup,
    )

    from sqdf.training.update import scheduled_lr

    lr, w, T = 1e-3, 4, 20

    def rates(schedule: str, lr_min: float = 0.0) -> list[float]:
        cfg = dataclasses.replace(tiny_config, steps=T, lr=lr, lr_schedule=schedule,
                                  lr_warmup=w, lr_min=lr_min)  # fmt: skip
        return [scheduled_lr(cfg, u) for u in range(T + 1)]

    cosine, linear, constant = rates("cosine"), rates("linear", 1e-4), rates("constant")
    assert cosine[:T] == pytest.approx(_diffusers_rates(
        get_cosine_schedule_with_warmup, T, lr, num_warmup_steps=w, num_training_steps=T
    ), rel=1e-12)  # fmt: skip
    assert linear[:T] == pytest.approx(_diffusers_rates(
        get_polynomial_decay_schedule_with_warmup, T, lr, num_warmup_steps=w,
        num_training_steps=T, lr_end=1e-4, power=1.0,
    ), rel=1e-12)  # fmt: skip
    assert constant[:T] == pytest.approx(_diffusers_rates(
        get_constant_schedule_with_warmup, T, lr, num_warmup_steps=w
    ), rel=1e-12)  # fmt: skip
    # warm-up from 0 to lr, linear in between
    for r in (cosine, linear, constant):
        assert r[0] == 0.0 and r[w // 2] == pytest.approx(lr / 2) and r[w] == pytest.approx(lr)
    floored = rates("cosine", 2e-4)
    mid = w + (T - w) // 2
    assert floored[mid] == pytest.approx((lr + 2e-4) / 2)  # cos(pi/2) = 0
    assert floored[T] == pytest.approx(2e-4) and linear[T] == pytest.approx(1e-4)
    assert linear[mid] == pytest.approx((lr + 1e-4) / 2)
    assert constant[T] == lr
    # without warm-up the first update is made at the full rate
    assert scheduled_lr(dataclasses.replace(tiny_config, lr_schedule="cosine"), 0) == tiny_config.lr


def test_a_cosine_run_interrupted_and_resumed_gives_the_uninterrupted_result(
    tiny_config, tmp_path, monkeypatch
):
    import sqdf.training.trainer as trainer
    from sqdf.training.update import scheduled_lr

    cfg = dataclasses.replace(tiny_config, lr=1e-2, lr_schedule="cosine", lr_warmup=2,
                              lr_min=1e-3, log_every=1, checkpoint_every=3)  # fmt: skip
    straight = train(cfg, tmp_path / "straight", progress=False)
    # killed after update 5 is logged: updates 4 and 5, past the checkpoint at 3, are lost
    log_update = trainer.log_update

    def log_then_die(s, done, *args):
        row = log_update(s, done, *args)
        if done == 5:
            raise RuntimeError("killed")
        return row

    with monkeypatch.context() as m:
        m.setattr(trainer, "log_update", log_then_die)
        with pytest.raises(RuntimeError, match="killed"):
            train(cfg, tmp_path / "resumed", progress=False)
    resumed = train(cfg, tmp_path / "resumed", resume=True, progress=False)
    ws, wr = (load_file(str(r / "final" / "policy.safetensors")) for r in (straight, resumed))
    assert all(torch.equal(ws[k], wr[k]) for k in ws)
    rows_s, rows_r = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in rows_r] == [r["step"] for r in rows_s] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows_r] == [r["loss"] for r in rows_s]
    # the row of update n (counted from 1) has the rate it was made at
    want = [scheduled_lr(cfg, r["step"] - 1) for r in rows_s]
    assert [r["lr"] for r in rows_s] == [r["lr"] for r in rows_r] == pytest.approx(want)
    assert want[0] == 0.0 and want[2] == pytest.approx(cfg.lr) and want[3] > want[5] > cfg.lr_min
    with pytest.raises(SqdfError, match="lr_schedule cosine decays over its 6 steps"):
        train(dataclasses.replace(cfg, steps=8), resumed, resume=True, progress=False)


def loss_check_config(**over) -> TrainConfig:
    """A gmm2d run whose every update is logged, one micro-batch each, whose reward is far
    from zero (so that a misweighted reward term shows) and whose lr lets the policy leave the
    reference within a few updates (so that the KL term does)."""
    values = dict(num_steps=10, steps=4, batch_size=16, buffer_size=64, log_every=1,
                  checkpoint_every=0, device="cpu", estimator="tweedie", reward="quadratic",
                  gamma=0.9, alpha=2.0, kl_scale="sum", lr=1e-2,
                  task_params={"hidden": 16})  # fmt: skip
    return TrainConfig(**{**values, **over})


def test_the_logged_loss_is_the_discounted_soft_q_objective_of_its_cells(tmp_path, monkeypatch):
    from sqdf.tasks.gmm2d import GMM2DTask
    from tests.learning import assert_loss_is_the_soft_q_objective, recording_sqdf_cells

    cfg = loss_check_config()
    with recording_sqdf_cells(monkeypatch, GMM2DTask) as cells:
        run = train(cfg, tmp_path / "run", progress=False)
    losses = [r["loss"] for r in read_metrics(run)]
    assert_loss_is_the_soft_q_objective(
        losses, cells, num_steps=cfg.num_steps, gamma=cfg.gamma, alpha=cfg.alpha
    )


def test_fresh_trajectories_sets_the_fresh_count_per_round(tmp_path):
    # the reference code's budget: batch x accumulation fresh trajectories a round, sampled
    # in batches of batch_size; 0 keeps one batch's worth
    from sqdf.training.start import batch_note

    cfg = TrainConfig(task="gmm2d", steps=4, num_steps=4, batch_size=4, grad_accum=2,
                      fresh_trajectories=10, replay_ratio=2, buffer_size=64, device="cpu",
                      log_every=1, checkpoint_every=0)  # fmt: skip
    run = train(cfg, tmp_path / "r", progress=False)
    rows = read_metrics(run)
    assert [r["samples_seen"] for r in rows] == [10, 10, 20, 20]  # every replay_ratio updates
    assert "20 fresh trajectories every 2 update(s) = 10 per process x 2 process(es)" in (
        batch_note(cfg, 2)
    )
    assert TrainConfig(batch_size=4).fresh_count == 4


def test_the_loss_scaler_unscales_before_the_clip_and_skips_an_overflow():
    # float16's path on the CPU: the scaled gradient is unscaled before the norm is taken and
    # the step made; an infinite gradient skips the update (weights untouched), halves the scale
    from types import SimpleNamespace

    from sqdf.infra.distributed import Processes
    from sqdf.training.state import Gradients
    from sqdf.training.update import apply_update

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    s = SimpleNamespace(
        cfg=TrainConfig(max_grad_norm=0.0, max_skips=5), scaler=scaler, procs=Processes("cpu"),
        params=[w], optimizer=opt, counters={"skipped_updates": 0}, consecutive_skips=0, ema=None,
    )  # fmt: skip
    scaler.scale((w * torch.tensor([3.0, 4.0])).sum()).backward()  # true gradient (3, 4)
    norm = apply_update(s, Gradients(), torch.zeros(4))
    assert norm == pytest.approx(5.0)  # the unscaled gradient's norm, not 1024 x 5
    assert w.detach().tolist() == pytest.approx([1.0 - 1.5, -2.0 - 2.0])
    assert scaler.get_scale() == 1024.0
    before = w.detach().clone()
    opt.zero_grad()
    scaler.scale((w * torch.tensor([float("inf"), 1.0])).sum()).backward()
    grads = Gradients()
    apply_update(s, grads, torch.zeros(4))
    assert grads.skip and "float16 overflow" in grads.cause
    assert torch.equal(w.detach(), before) and s.counters["skipped_updates"] == 1
    assert scaler.get_scale() == 512.0


@pytest.mark.parametrize("scaled", [False, True])
def test_a_step_ends_a_run_of_skipped_updates(scaled):
    # max_skips counts skips in a row: a step between them starts the count again, whether
    # the optimizer steps itself or a loss scaler (float16's path, on the CPU) steps it
    from types import SimpleNamespace

    from sqdf.errors import DivergedError
    from sqdf.infra.distributed import Processes
    from sqdf.training.state import Gradients
    from sqdf.training.update import apply_update

    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaled else None
    s = SimpleNamespace(
        cfg=TrainConfig(max_grad_norm=0.0, max_skips=2), scaler=scaler, procs=Processes("cpu"),
        params=[w], optimizer=opt, counters={"skipped_updates": 0}, consecutive_skips=0, ema=None,
    )  # fmt: skip
    apply_update(s, Gradients(skip=True, cause="a test's skip"), torch.zeros(4))
    assert s.consecutive_skips == 1
    loss = (2 * w).sum()  # gradient 2, unscaled before the step
    (scaler.scale(loss) if scaled else loss).backward()
    apply_update(s, Gradients(), torch.zeros(4))
    assert s.consecutive_skips == 0 and w.item() == pytest.approx(0.0)
    apply_update(s, Gradients(skip=True, cause="a test's skip"), torch.zeros(4))
    with pytest.raises(DivergedError, match="2 consecutive updates skipped"):
        apply_update(s, Gradients(skip=True, cause="a test's skip"), torch.zeros(4))
    assert s.counters["skipped_updates"] == 3


def test_the_update_row_has_the_rewards_mean_and_sample_std_and_each_components_mean(tmp_path):
    # from count_update's tally (sum, sum of squares, count, then each mixture component's sum
    # and count), against numpy; a component with no count yet is NaN
    import json
    import time
    from types import SimpleNamespace

    import numpy as np

    from sqdf.infra.distributed import Processes
    from sqdf.rewards.analytic import LinearReward
    from sqdf.rewards.mixture import WeightedReward
    from sqdf.training.state import Gradients
    from sqdf.training.update import log_update

    counters = ("samples_seen", "reward_evals", "skipped_updates", "nonfinite_rewards", "sample_s")
    mixture = WeightedReward({"a": 1.0, "b": 2.0, "c": 1.0},
                             {k: LinearReward() for k in "abc"})  # fmt: skip
    s = SimpleNamespace(
        cfg=TrainConfig(), procs=Processes("cpu"), task=SimpleNamespace(reward_model=mixture),
        optimizer=SimpleNamespace(param_groups=[{"lr": 0.25}]), t0=time.perf_counter(),
        run=tmp_path, trackers=None, counters=dict.fromkeys(counters, 0),
    )  # fmt: skip
    for r in ([1.0, 2.0], [0.5, -1.0, 3.0, 7.0], [3.0]):
        x = np.array(r)
        parts = [x[:1].sum(), 1, x.sum(), len(x), 0.0, 0]
        tally = torch.tensor([0, 0, 0, 0, x.sum(), (x**2).sum(), len(x), 0, *parts],
                             dtype=torch.float64)  # fmt: skip
        stats = {"kl_mean": 0.5, "q_mean": 1.0}
        row = log_update(s, 3, Gradients(loss=0.75, stats=stats), tally, 2.0)
        assert row["reward_mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert row["reward_std"] == (
            pytest.approx(np.std(x, ddof=1), rel=1e-12) if len(x) > 1 else 0.0
        )  # one reward: no spread
        assert row["reward_a_mean"] == x[0] and row["reward_b_mean"] == pytest.approx(x.mean())
        assert math.isnan(row["reward_c_mean"])
        assert (row["loss"], row["kl_mean"], row["lr"], row["grad_norm"]) == (0.75, 0.5, 0.25, 2.0)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_mean_stats_refuses_a_statistic_the_method_did_not_declare():
    from sqdf.infra.distributed import Processes
    from sqdf.training.update import mean_stats

    procs = Processes("cpu")
    out = mean_stats(procs, ("kl_mean", "q_mean"), {"kl_mean": 0.5})
    assert out["kl_mean"] == 0.5 and math.isnan(out["q_mean"])  # none computed it: NaN
    with pytest.raises(RuntimeError, match=r"the loss reported \['clip_frac'\], not in its Method"):
        mean_stats(procs, ("kl_mean",), {"kl_mean": 0.5, "clip_frac": 0.0})


def test_the_gradient_phase_hands_the_loss_the_runs_generator_and_averages_micro_batches(
    monkeypatch,
):
    from types import SimpleNamespace

    import sqdf.training.gradients as gradients
    from sqdf.infra.distributed import Processes
    from sqdf.methods import METHODS
    from sqdf.training.state import Fresh

    w = torch.nn.Parameter(torch.tensor(1.0))
    seen = []

    def loss(task, cells, cfg, params, generator):
        seen.append(generator)
        k = len(seen)  # micro-batch k: loss k w, kl_mean k, two reward evaluations
        return k * w, {"kl_mean": float(k), "q_mean": 0.0, "reward_evals": 2.0}

    monkeypatch.setitem(gradients.METHODS, "sqdf", dataclasses.replace(METHODS["sqdf"], loss=loss))
    buffer = SimpleNamespace(size=4, sample_cells=lambda n, g: None)
    s = SimpleNamespace(
        cfg=TrainConfig(grad_accum=4), procs=Processes("cpu"), generator=torch.Generator(),
        optimizer=SimpleNamespace(zero_grad=lambda set_to_none: None), buffer=buffer, task=None,
        method_params=None,
        scaler=None, phase="",
    )  # fmt: skip
    grads = gradients.accumulate_gradients(s, Fresh())
    assert len(seen) == 4 and all(g is s.generator for g in seen)
    # the mean over micro-batches: (1 + 2 + 3 + 4) / 4, for the loss, its gradient and stats
    assert grads.loss == 2.5 and grads.stats["kl_mean"] == 2.5 and float(w.grad) == 2.5
    assert grads.method_evals == 8 and not grads.skip
