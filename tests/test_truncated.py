"""Truncated rollouts (issue 7): the states equal a full rollout's, and training with them
runs the SQDF update on exactly those cells, and learns."""

import math

import pytest
import torch

from sqdf.config.train_config import TrainConfig
from sqdf.errors import ConfigError
from sqdf.run.folder import read_metrics
from sqdf.sampling.sampler import sample_states_at, sample_trajectories
from sqdf.tasks import build_task
from sqdf.training.trainer import train
from tests.learning import assert_reward_rose


def cfg(**over) -> TrainConfig:
    values = dict(num_steps=12, steps=4, batch_size=16, buffer="on_policy", device="cpu",
                  estimator="tweedie", task_params={"hidden": 16}, rollout="truncated",
                  log_every=1, checkpoint_every=0)  # fmt: skip
    return TrainConfig(**{**values, **over})


def test_truncated_states_equal_a_full_rollouts():
    c = cfg()
    torch.manual_seed(0)
    task = build_task(c)
    n = 16
    steps = torch.randint(0, c.num_steps, (n, 3), generator=torch.Generator().manual_seed(5))
    steps[0] = torch.tensor([0, 0, 0])  # a trajectory that needs no step at all
    steps[1] = torch.tensor([11, 3, 7])  # one that needs the last
    states, cond = sample_states_at(task, n, steps, torch.Generator().manual_seed(9))
    full = sample_trajectories(task, n, torch.Generator().manual_seed(9))
    assert torch.equal(cond, full.cond)
    want = full.states[torch.arange(n)[:, None], steps]
    torch.testing.assert_close(states, want, rtol=1e-5, atol=1e-6)


def test_truncated_training_counts_partial_trajectories_and_learns(tmp_path, monkeypatch):
    import dataclasses

    import sqdf.training.gradients
    from sqdf.methods import METHODS

    drawn, trained = [], []
    draw, loss = sqdf.training.gradients.truncated_cells, METHODS["sqdf"].loss

    def recorded_draw(*args):
        drawn.append(draw(*args))
        return drawn[-1]

    def recorded_loss(task, cells, *args):
        trained.append(cells)
        return loss(task, cells, *args)

    monkeypatch.setattr(sqdf.training.gradients, "truncated_cells", recorded_draw)
    monkeypatch.setitem(METHODS, "sqdf", dataclasses.replace(METHODS["sqdf"], loss=recorded_loss))
    run = train(cfg(cells_per_trajectory=2), tmp_path / "r", progress=False)
    # every update's loss is taken on the cells drawn for it, and on nothing else: 16
    # trajectories, each at 2 distinct steps
    assert len(trained) == len(drawn) == 4
    assert all(t is d for t, d in zip(trained, drawn, strict=True))
    for cells in drawn:
        assert cells.x_t.shape == (16 * 2, 2) and cells.x_next is None
        pairs = cells.step.reshape(16, 2)
        assert bool((pairs[:, 0] != pairs[:, 1]).all())
    assert_reward_rose(run)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["samples_seen"] == 4 * 16
    assert rows[-1]["reward_evals"] == 4 * 16 * 2  # one per cell, none for fresh samples
    assert math.isnan(rows[-1]["reward_mean"])  # no trajectory reached its end
    assert 0 < rows[0]["sample_s"] < rows[-1]["sample_s"] < rows[-1]["wall_s"]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)


def test_each_truncated_micro_batch_counts_its_trajectories():
    # grad_accum micro-batches of fresh part-way trajectories: each adds its batch_size
    from types import SimpleNamespace

    from sqdf.training.gradients import draw_cells
    from sqdf.training.state import Gradients

    c = cfg(batch_size=4, num_steps=6, cells_per_trajectory=2)
    s = SimpleNamespace(cfg=c, task=build_task(c), generator=torch.Generator().manual_seed(0),
                        counters={"sample_s": 0.0}, phase="gradient")  # fmt: skip
    grads = Gradients()
    for _ in range(3):
        assert draw_cells(s, grads).x_t.shape == (4 * 2, 2)
    assert grads.partial == 3 * 4 and s.counters["sample_s"] > 0 and s.phase == "gradient"


@pytest.mark.parametrize(
    "over,message",
    [
        (dict(buffer="prioritized"), "needs method sqdf, buffer on_policy and replay_ratio 1"),
        (dict(replay_ratio=2), "needs method sqdf, buffer on_policy and replay_ratio 1"),
        (dict(rollout="partial"), "unknown rollout 'partial'"),
        (dict(rollout="full", cells_per_trajectory=2), "needs rollout 'truncated'"),
        (dict(cells_per_trajectory=13), "cells_per_trajectory must be in [1, num_steps]"),
    ],
)
def test_truncated_settings_that_cannot_work_are_refused(over, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cfg(**over)


def test_speed_guide_commands_run(tmp_path, monkeypatch):
    import shlex

    from sqdf.cli import main
    from tests.doc_commands import doc_block

    block = doc_block("docs/guides/speed.md", "--rollout truncated")
    monkeypatch.chdir(tmp_path)
    quick = ["--steps", "1", "--num-steps", "4", "--batch-size", "4", "--buffer-size", "8",
             "--device", "cpu", "--no-progress"]  # fmt: skip
    ran = 0
    for line in block.strip().splitlines():
        argv = shlex.split(line, comments=True)
        if argv[0] == "sqdf":
            assert main(argv[1:] + quick) == 0, line
            ran += 1
    assert ran == 3
    assert (tmp_path / "runs" / "trunc2" / "final" / "policy.safetensors").is_file()
