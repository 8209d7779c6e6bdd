"""A CI-sized mutation guard: hand-picked mutants of the training code, each applied in
process (monkeypatched for one test), must be caught by the suite's key checks of learning,
run through their short trainings as the suite runs them. The unmutated code passes them
all (else a check that always fails would "catch" every mutant). scripts/mutation.sh runs a
mutation tool over sqdf/core/, sqdf/methods/ and the update phase for the whole picture
(docs/reliability.md)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import sqdf.core.kl
import sqdf.core.loss
import sqdf.methods.sqdf
import sqdf.training.trainer
from tests import test_trainer  # imported as a module: its tests are not collected twice

# --- the mutants: each as a programmer's slip would write it --------------------------------


def no_optimizer_step(m: pytest.MonkeyPatch) -> None:
    """apply_update's ``s.optimizer.step()`` replaced by ``pass``: a run that trains nothing."""
    real = sqdf.training.trainer.apply_update

    def apply_update(s, grads, tally):
        s.optimizer.step = lambda *args, **kwargs: None  # shadows the bound method
        try:
            return real(s, grads, tally)
        finally:
            del s.optimizer.step

    m.setattr(sqdf.training.trainer, "apply_update", apply_update)


def kl_sign_flipped_in_the_loss(m: pytest.MonkeyPatch) -> None:
    """soft_q_loss with ``- alpha * kl``: the KL pushes the policy away from the reference."""

    def soft_q_loss(reward, kl, step_index, num_steps, gamma, alpha):
        weight = sqdf.core.loss.discount_weight(step_index, num_steps, gamma)
        return -weight.to(reward.device, reward.dtype) * reward - alpha * kl

    m.setattr(sqdf.methods.sqdf, "soft_q_loss", soft_q_loss)


def kl_sign_flipped_in_gaussian_kl(m: pytest.MonkeyPatch) -> None:
    """gaussian_kl returning minus the KL (the same slip, one function further in)."""
    real = sqdf.core.kl.gaussian_kl
    m.setattr(sqdf.methods.sqdf, "gaussian_kl", lambda *args: -real(*args))


def discount_exponent_off_by_one(m: pytest.MonkeyPatch) -> None:
    """gamma^(T-k) for gamma^(T-k-1): every reward weighted one step too little."""

    def discount_weight(step_index, num_steps, gamma):
        exponent = (num_steps - step_index).to(torch.float64)
        return torch.pow(torch.tensor(gamma, dtype=torch.float64), exponent).float()

    m.setattr(sqdf.core.loss, "discount_weight", discount_weight)


def reward_gradient_detached(m: pytest.MonkeyPatch) -> None:
    """The soft Q detached before the loss: its value is logged, its gradient is lost."""
    real = sqdf.methods.sqdf.soft_q_loss
    m.setattr(sqdf.methods.sqdf, "soft_q_loss", lambda reward, *args: real(reward.detach(), *args))


# --- the key checks: the suite's own tests, each a short training ---------------------------


def reward_rises(tmp_path, monkeypatch, tiny_config) -> None:
    test_trainer.test_eval_and_sample(tiny_config, tmp_path)


def loss_is_the_objective(tmp_path, monkeypatch, tiny_config) -> None:
    test_trainer.test_the_logged_loss_is_the_discounted_soft_q_objective_of_its_cells(
        tmp_path, monkeypatch
    )


CHECKS: dict[str, Callable] = {"reward_rises": reward_rises, "loss": loss_is_the_objective}

# which check must catch each mutant (others may catch it too)
MUTANTS: dict[Callable, str] = {
    no_optimizer_step: "reward_rises",
    kl_sign_flipped_in_the_loss: "loss",
    kl_sign_flipped_in_gaussian_kl: "loss",
    discount_exponent_off_by_one: "loss",
    reward_gradient_detached: "reward_rises",
}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_the_unmutated_code_passes_every_check(check, tmp_path, monkeypatch, tiny_config):
    CHECKS[check](tmp_path, monkeypatch, tiny_config)


@pytest.mark.parametrize("mutant", list(MUTANTS), ids=lambda f: f.__name__)
def test_each_mutant_is_caught(mutant, tmp_path, monkeypatch, tiny_config):
    check = MUTANTS[mutant]
    with monkeypatch.context() as m:
        mutant(m)
        with pytest.raises(AssertionError):
            CHECKS[check](tmp_path, monkeypatch, tiny_config)
