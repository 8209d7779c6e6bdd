"""Checks that a run learned what its method says, shared by the tests whose names claim it
and by tests/test_mutants.py, which runs hand-picked mutants of the library through them: a
run that trained nothing, or trained the wrong objective, must fail them."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from sqdf.evaluation.evaluate import load_run, score_samples
from sqdf.sampling.sampler import samples_from_seed

SEED = 4242  # the checks' own noise and conditions, apart from a run's and an evaluation's

Reward = Callable[[Tensor, Tensor], Tensor]


def paired_reward_gain(run: Path, n: int = 64, *, reward: Reward | None = None) -> Tensor:
    """(n,) the reward of the run's final policy minus the reference's, sample by sample,
    both drawn from the same noise and conditions: what training changed, without the noise
    two independent draws would add. ``reward``: (x0, cond) -> (n,), the task's by default."""
    task = load_run(run)
    cond, x_policy = samples_from_seed(task, n, SEED)
    _, x_reference = samples_from_seed(task, n, SEED, policy=False, cond=cond)
    with torch.no_grad():
        if reward is None:
            return score_samples(task, x_policy, cond) - score_samples(task, x_reference, cond)
        return reward(x_policy, cond) - reward(x_reference, cond)


def assert_reward_rose(run: Path, n: int = 64, *, reward: Reward | None = None) -> Tensor:
    """The final policy's reward is above the reference's on the same noise by more than two
    standard errors of the paired differences: a rise that the sampling noise of ``n`` pairs
    does not explain. A run whose weights never moved gives differences of exactly 0."""
    gain = paired_reward_gain(run, n, reward=reward).double()
    mean, se = float(gain.mean()), float(gain.std()) / math.sqrt(n)
    assert mean > 2 * se, f"reward gain {mean:.3g} is not above 2 standard errors ({se:.3g})"
    return gain


def assert_lora_moved(weights: Path) -> None:
    """A LoRA policy (B zero-initialised: it starts as the reference) whose B moved: no weight
    decay can do that, only a step with a gradient."""
    b = [v for k, v in load_file(str(weights)).items() if "lora_B" in k]
    assert b and any(float(v.abs().max()) > 0 for v in b), "every LoRA B is still zero"


@dataclass
class CellRecord:
    """Per update of a SQDF run (one micro-batch each): the steps its cells were drawn at, the
    soft Q and the KL the loss saw, per cell."""

    step: list[Tensor] = field(default_factory=list)
    q: list[Tensor] = field(default_factory=list)
    kl: list[Tensor] = field(default_factory=list)


@contextmanager
def recording_sqdf_cells(monkeypatch: pytest.MonkeyPatch, task_class: type) -> Iterator[CellRecord]:
    """Record what each call of the SQDF loss reads: the task's soft Q (of ``task_class``)
    and the step KL. Only the values are recorded; the loss is not touched."""
    import sqdf.methods.sqdf as method

    record = CellRecord()
    soft_q, kl = task_class.soft_q, method.gaussian_kl

    def recorded_soft_q(self, x_prev, step_index, *args, **kwargs):
        value = soft_q(self, x_prev, step_index, *args, **kwargs)
        record.step.append(step_index.detach().cpu())
        record.q.append(value.detach().double().cpu())
        return value

    def recorded_kl(*args, **kwargs):
        value = kl(*args, **kwargs)
        record.kl.append(value.detach().double().cpu())
        return value

    with monkeypatch.context() as m:
        m.setattr(task_class, "soft_q", recorded_soft_q)
        m.setattr(method, "gaussian_kl", recorded_kl)
        yield record


def assert_loss_is_the_soft_q_objective(
    losses: list[float], record: CellRecord, *, num_steps: int, gamma: float, alpha: float
) -> None:
    """Each logged loss is the SQDF objective of its cells, written here from the paper:
    mean over cells of -gamma^(T-k-1) Q_k + alpha KL_k (the exact summed KL). Needs updates
    after the first, where the policy has left the reference and the KL is not zero."""
    assert len(losses) == len(record.q) == len(record.kl) > 1
    assert all(bool((kl >= 0).all()) for kl in record.kl), "a KL below zero"
    assert any(float(kl.abs().max()) > 0 for kl in record.kl), "the policy never left the reference"
    for loss, k, q, kl in zip(losses, record.step, record.q, record.kl, strict=True):
        weight = torch.tensor(gamma, dtype=torch.float64) ** (num_steps - 1 - k).double()
        want = float((-weight * q + alpha * kl).mean())
        assert loss == pytest.approx(want, rel=1e-5, abs=1e-7)
