"""SQDF's soft Q read to first order about the reference's step mean (q_at =
"reference_mean"): the linearisation's value and gradient, its per-step optimum (the
first-order Gaussian step) and a run with it."""

from __future__ import annotations

import pytest
import torch

from sqdf.errors import ConfigError
from sqdf.methods import METHODS, build_method_params
from sqdf.methods.sqdf import linearised_q
from sqdf.run.settings import make_config
from sqdf.sampling.buffer import Cells
from sqdf.sampling.sampler import sample_trajectories, step_mean_std
from sqdf.tasks import build_task
from sqdf.training.trainer import train
from tests.learning import assert_reward_rose


def gmm_config(**over):
    values = {"task": "gmm2d", "reward": "quadratic", "alpha": 1.0, "gamma": 1.0,
              "estimator": "exact", "num_steps": 10, "steps": 2, "batch_size": 16,
              "buffer_size": 32, **over}  # fmt: skip
    return make_config(values, source="test")


def test_the_linearisation_has_the_q_value_and_gradient_of_its_anchor():
    task = build_task(gmm_config())
    g = torch.Generator().manual_seed(0)
    anchor = torch.randn(5, 2, generator=g)
    step, cond = torch.tensor([0, 3, 5, 8, 9]), torch.zeros(5, dtype=torch.long)
    x = (anchor + 0.1 * torch.randn(5, 2, generator=g)).requires_grad_(True)
    lin = linearised_q(task, anchor, x, step, cond, g)
    at = anchor.clone().requires_grad_(True)
    q = task.soft_q(at, step, cond, g)
    (want,) = torch.autograd.grad(q.sum(), at)
    (got,) = torch.autograd.grad(lin.sum(), x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(linearised_q(task, anchor, anchor, step, cond, g), q.detach())
    assert not torch.allclose(lin.detach(), task.soft_q(x.detach(), step, cond, g))


@pytest.mark.parametrize("q_at", ["reference_mean", "sample"])
def test_its_per_step_optimum_is_the_first_order_step(q_at):
    # one cell's loss, as a function of the policy's step mean, is stationary at
    # mean_ref + sigma² grad Q(mean_ref) / alpha (at any noise draw) with the linearised Q;
    # the Q at the drawn sample has its optimum elsewhere
    cfg = gmm_config()
    task = build_task(cfg)
    params = build_method_params("sqdf", {"q_at": q_at})
    traj = sample_trajectories(task, 4, torch.Generator().manual_seed(1), policy=False)
    k, rows = torch.tensor([2, 4, 6, 8]), torch.arange(4)
    x_t, cond = traj.states[rows, k], traj.cond
    with torch.no_grad():
        ref_mean, std = step_mean_std(task, x_t, k, cond, policy=False)
    at = ref_mean.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(task.soft_q(at, k, cond).sum(), at)
    offset = (std**2 * grad / task.alpha).requires_grad_(True)  # the first-order step's
    reference = task.model_output

    def policy_output(x, t, cond, *, policy):  # the step mean moved by ``offset``
        out = reference(x, t, cond, policy=False)
        if not policy:
            return out
        slope = task.kernel.step(out + 1.0, x, k)[0] - task.kernel.step(out, x, k)[0]
        return out + offset / slope

    task.model_output = policy_output
    cells = Cells(x_t=x_t, x_next=traj.states[rows, k + 1], step=k, cond=cond,
                  reward=torch.zeros(4), index=rows)  # fmt: skip
    loss, _ = METHODS["sqdf"].loss(task, cells, cfg, params, torch.Generator().manual_seed(2))
    (g,) = torch.autograd.grad(loss, offset)
    # float32: 1 / sigma² of the last steps' small sigma leaves ~1e-4 of rounding
    if q_at == "reference_mean":
        assert float(g.abs().max()) < 1e-3
    else:
        assert float(g.abs().max()) > 5e-2


def test_a_run_with_it_trains_and_a_bad_value_is_refused(tmp_path):
    run = train(gmm_config(method_params={"q_at": "reference_mean"}), tmp_path / "run",
                progress=False)  # fmt: skip
    assert_reward_rose(run)
    message = "method 'sqdf': q_at must be one of sample, reference_mean, got 'mode'"
    with pytest.raises(ConfigError, match=message):
        build_method_params("sqdf", {"q_at": "mode"})


def test_the_gmm2d_exact_preset_trains_with_the_first_order_q(tmp_path):
    """The recommended gmm2d setting's preset (docs/results/gmm2d-preset.md), shrunk by flags."""
    import json

    from sqdf.cli import main

    out = tmp_path / "run"
    argv = ["train", "--preset", "gmm2d-exact", "--steps", "3", "--lr-warmup", "1",
            "--num-steps", "10", "--grad-accum", "2", "--batch-size", "16", "--buffer-size",
            "32", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    train_cfg = json.loads((out / "config.json").read_text())["train"]
    assert train_cfg["method_params"] == {"q_at": "reference_mean"}
    assert (train_cfg["estimator"], train_cfg["lr_schedule"], train_cfg["gamma"]) == (
        "exact",
        "cosine",
        1.0,
    )
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    # update 2 of 3 after one warm-up update: half way down the cosine from 0.006
    assert last["step"] == 3 and last["lr"] == pytest.approx(0.003)
