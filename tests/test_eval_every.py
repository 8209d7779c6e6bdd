"""--eval-every: a small evaluation every N updates into eval_metrics.jsonl and the trackers,
from its own fixed seeds (the run trains as without it), whole and without repeats after a
resume, and on sd on the held-out prompts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from sqdf.evaluation.evaluate import score_samples
from sqdf.evaluation.periodic_eval import SAMPLES, SEED
from sqdf.run.folder import EVAL_METRICS, read_metrics
from sqdf.sampling.sampler import sample_in_chunks
from sqdf.training.trainer import train
from tests.learning import assert_reward_rose
from tests.test_trackers import die_in_update, tensorboard_scalars


def test_evaluations_every_n_updates_leave_the_run_as_it_was(tiny_config, tmp_path):
    plain = train(tiny_config, tmp_path / "plain", progress=False)
    cfg = dataclasses.replace(tiny_config, eval_every=3, log_with="tensorboard")
    run = train(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(run, EVAL_METRICS)
    assert [r["step"] for r in rows] == [3, 6]
    assert {"reward_mean", "ref_reward_mean", "kl_path", "target_mode_tv"} <= set(rows[0])
    assert rows[0]["ref_reward_mean"] == rows[1]["ref_reward_mean"]
    scalars = tensorboard_scalars(run)
    for key in ("reward_mean", "kl_path", "target_mode_tv"):
        assert [s for s, _ in scalars[f"eval/{key}"]] == [3, 6]
        assert scalars[f"eval/{key}"][1][1] == pytest.approx(rows[1][key], rel=1e-6)
    a, b = (load_file(str(r / "final" / "policy.safetensors")) for r in (plain, run))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the run's stream was not touched


def test_the_last_evaluation_is_the_final_policy_scored_on_its_seed(tiny_config, tmp_path):
    from sqdf.evaluation.evaluate import load_run

    cfg = dataclasses.replace(tiny_config, eval_every=6)
    run = train(cfg, tmp_path / "run", progress=False)
    (row,) = read_metrics(run, EVAL_METRICS)
    task = load_run(run)
    traj = sample_in_chunks(task, SAMPLES, SEED, with_kl=True)
    reward = score_samples(task, traj.x0, traj.cond).mean()
    assert row["reward_mean"] == pytest.approx(float(reward))
    assert row["kl_path"] == pytest.approx(float(traj.kl.sum(1).mean()), rel=1e-5)


def test_a_resumed_run_evaluates_each_step_once_with_the_same_values(
    tiny_config, tmp_path, monkeypatch
):
    import sqdf.training.trainer

    cfg = dataclasses.replace(tiny_config, eval_every=1, checkpoint_every=3)
    whole = read_metrics(train(cfg, tmp_path / "whole", progress=False), EVAL_METRICS)
    real = die_in_update(monkeypatch, 5)  # evaluations 1-4 written, checkpoint at 3: 4 again
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", progress=False)
    assert [r["step"] for r in read_metrics(tmp_path / "run", EVAL_METRICS)] == [1, 2, 3, 4]
    monkeypatch.setattr(sqdf.training.trainer, "apply_update", real)
    run = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert read_metrics(run, EVAL_METRICS) == whole  # same steps, same numbers


def test_eval_every_on_digits_logs_the_evaluator_metrics(tmp_path):
    from sqdf.run.settings import config_for

    cfg = config_for("digits", steps=2, batch_size=4, num_steps=4, eval_every=2)
    run = train(cfg, tmp_path / "d", progress=False)
    (row,) = read_metrics(run, EVAL_METRICS)
    assert {"eval_agreement", "ref_eval_agreement", "eval_frechet", "kl_path"} <= set(row)
    # it evaluated the trained policy (which learned), not the reference
    assert_reward_rose(run)
    assert row["kl_path"] > 0 and row["reward_mean"] > row["ref_reward_mean"]  # same noise


def test_eval_every_on_sd_scores_the_held_out_prompts(tmp_path):
    from tests.tasks.sd_runs import sd_config, write_tiny_parts

    write_tiny_parts(tmp_path)
    prompts = tmp_path / "held.txt"
    prompts.write_text("an owl\na crab\n")
    cfg = sd_config(tmp_path / "sd", tmp_path, eval_every=1, ema_decay=0.5,
                    task_params={"eval_prompts": str(prompts)})  # fmt: skip
    run = train(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(run, EVAL_METRICS)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["ref_reward_mean"] == rows[1]["ref_reward_mean"]
    assert rows[1]["kl_path"] > 0 and rows[1]["frechet_to_reference"] > 0


RANDOM_REWARD = """
import torch

def noisy_ink(images, cond):  # random pixel weights: the gradient depends on the draw
    return (images.flatten(1) * torch.rand(images[0].numel())).mean(1)
"""


def test_a_reward_drawing_from_the_global_generator_trains_as_without_evaluations(
    tmp_path, monkeypatch
):
    import sys

    from sqdf.run.settings import config_for

    (tmp_path / "eval_every_reward.py").write_text(RANDOM_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = config_for("digits", reward="eval_every_reward:noisy_ink", steps=2, batch_size=4,
                      num_steps=4, checkpoint_every=0)  # fmt: skip
    torch.manual_seed(0)
    plain = train(base, tmp_path / "plain", progress=False)
    torch.manual_seed(0)
    run = train(dataclasses.replace(base, eval_every=1, sample_every=1), tmp_path / "run",
                progress=False)  # fmt: skip
    sys.modules.pop("eval_every_reward", None)
    a, b = (load_file(str(r / "final" / "policy.safetensors")) for r in (plain, run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_off_grid_resume_keeps_every_evaluation_in_tensorboard(tiny_config, tmp_path):
    cfg = dataclasses.replace(tiny_config, log_every=4, eval_every=3, checkpoint_every=3,
                              log_with="tensorboard")  # fmt: skip
    run = train(dataclasses.replace(cfg, steps=6), tmp_path / "run", progress=False)
    train(dataclasses.replace(cfg, steps=12), run, resume=True, progress=False)
    steps = [r["step"] for r in read_metrics(run, EVAL_METRICS)]
    assert steps == [3, 6, 9, 12]
    assert [s for s, _ in tensorboard_scalars(run)["eval/reward_mean"]] == steps


def test_bbo_refuses_eval_every(tiny_config, tmp_path):
    from sqdf.bbo import BboConfig, run_method
    from sqdf.errors import ConfigError

    cfg = dataclasses.replace(tiny_config, eval_every=2)
    with pytest.raises(ConfigError, match="drop eval_every"):
        run_method(BboConfig(rounds=1, queries_per_round=2), cfg, "sqdf", 0, tmp_path / "b",
                   progress=False)  # fmt: skip
