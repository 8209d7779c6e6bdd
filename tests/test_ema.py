"""--ema-decay: the moving average of the trainable weights, against the average computed by
hand from every update's weights; exact across a resume; what eval and sample load."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from sqdf.errors import ConfigError
from sqdf.evaluation.evaluate import evaluate_run, load_run, sample_run
from sqdf.sampling.sampler import sample_trajectories
from sqdf.tasks import build_task
from sqdf.training.trainer import train


def test_ema_is_the_moving_average_of_every_updates_weights(tiny_config, tmp_path):
    decay = 0.6
    cfg = dataclasses.replace(tiny_config, steps=5, checkpoint_every=1, keep_checkpoints=10,
                              ema_decay=decay)  # fmt: skip
    run = train(cfg, tmp_path / "run", progress=False)
    torch.manual_seed(cfg.seed)  # the initial policy, as train builds it
    ema = {k: v.clone() for k, v in build_task(cfg).policy.state_dict().items()}
    for step in range(1, 6):
        weights = load_file(str(run / "checkpoints" / f"step_{step:07d}" / "policy.safetensors"))
        d = min(decay, (1 + step) / (10 + step))  # warmed up as diffusers' EMAModel
        ema = {k: d * ema[k] + (1 - d) * weights[k] for k in ema}
        saved = load_file(str(run / "checkpoints" / f"step_{step:07d}" / "ema.safetensors"))
        for k in ema:
            torch.testing.assert_close(saved[k], ema[k])
    final = load_file(str(run / "final" / "ema" / "policy.safetensors"))
    raw = load_file(str(run / "final" / "policy.safetensors"))
    assert all(torch.equal(final[k], saved[k]) for k in final)
    assert any(not torch.equal(final[k], raw[k]) for k in final)
    # the trained weights are what they would be without the average
    plain = train(dataclasses.replace(tiny_config, steps=5), tmp_path / "plain", progress=False)
    trained = load_file(str(plain / "final" / "policy.safetensors"))
    assert all(torch.equal(trained[k], raw[k]) for k in raw)


def test_a_resumed_run_has_the_same_ema(tiny_config, tmp_path):
    cfg = dataclasses.replace(tiny_config, steps=6, checkpoint_every=3, ema_decay=0.9)
    whole = train(cfg, tmp_path / "whole", progress=False)
    train(dataclasses.replace(cfg, steps=3), tmp_path / "part", progress=False)
    part = train(cfg, tmp_path / "part", resume=True, progress=False)
    a, b = (load_file(str(r / "final" / "ema" / "policy.safetensors")) for r in (whole, part))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_and_sample_use_the_moving_average(tiny_config, tmp_path):
    cfg = dataclasses.replace(tiny_config, ema_decay=0.5)
    run = train(cfg, tmp_path / "run", progress=False)
    ema = load_file(str(run / "final" / "ema" / "policy.safetensors"))
    loaded = load_run(run).policy.state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)
    assert evaluate_run(run, num_samples=64)["weights"] == "ema"
    assert json.loads((run / "eval.json").read_text())["weights"] == "ema"
    no_ema = train(tiny_config, tmp_path / "plain", progress=False)
    assert evaluate_run(no_ema, num_samples=64)["weights"] == "final"
    # sqdf sample RUN draws from the average too
    picture = sample_run(run, num_samples=16, with_reference=False)
    drawn = load_file(str(picture.with_suffix(".safetensors")))["samples"]
    task = load_run(run)
    want = sample_trajectories(task, 16, torch.Generator().manual_seed(0)).x0
    torch.testing.assert_close(drawn, want)


def test_the_average_warms_up_and_bbo_refuses_it(tiny_config, tmp_path):
    from sqdf.bbo import BboConfig, run_method
    from sqdf.training.update import ema_decay_at

    assert ema_decay_at(0.999, 1) == 2 / 11 and ema_decay_at(0.999, 10**6) == 0.999
    cfg = dataclasses.replace(tiny_config, ema_decay=0.9)
    with pytest.raises(ConfigError, match="sqdf bbo keeps no moving average"):
        run_method(BboConfig(rounds=1, queries_per_round=2), cfg, "sqdf", 0, tmp_path / "b",
                   progress=False)  # fmt: skip


def test_ema_decay_out_of_range_is_one_clear_error(tiny_config):
    with pytest.raises(ConfigError, match=r"ema_decay must be in \[0, 1\), got 1.0"):
        dataclasses.replace(tiny_config, ema_decay=1.0)
