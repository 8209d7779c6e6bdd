"""The SQDF loss: its formula, its discount, and its gradient against finite differences (on
the VP and the flow-matching path)."""

import pytest
import torch
from torch.func import functional_call

from sqdf.config.train_config import TrainConfig
from sqdf.core import discount_weight, soft_q_loss
from sqdf.methods.sqdf import SqdfParams, sqdf_loss
from sqdf.sampling.buffer import Cells
from sqdf.tasks import build_task


def test_discount_weight():
    k = torch.arange(5)
    torch.testing.assert_close(
        discount_weight(k, 5, 0.5), torch.tensor([0.0625, 0.125, 0.25, 0.5, 1.0])
    )
    torch.testing.assert_close(discount_weight(k, 5, 1.0), torch.ones(5))


def test_soft_q_loss_formula():
    r, kl, k = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.25]), torch.tensor([0, 2])
    got = soft_q_loss(r, kl, k, num_steps=3, gamma=0.9, alpha=2.0)
    torch.testing.assert_close(got, torch.tensor([-0.81 * 1.0 + 1.0, -2.0 + 0.5]))


@pytest.mark.parametrize("process", ["vp", "flow"])
@pytest.mark.parametrize("estimator", ["tweedie", "consistency"])
def test_sqdf_gradient_matches_finite_differences(estimator, process):
    cfg = TrainConfig(
        num_steps=6,
        alpha=0.7,
        gamma=0.8,
        estimator=estimator,
        device="cpu",
        reward="quadratic",
        task_params={"hidden": 3, "ode_steps": 3, "num_modes": 3, "process": process},
    )
    torch.manual_seed(0)
    task = build_task(cfg)
    task.policy.double()
    # a non-zero policy, so the KL term has a gradient too
    for p in task.policy.parameters():
        p.data = 0.3 * torch.randn_like(p)
    g = torch.Generator().manual_seed(1)
    n = 5
    cells = Cells(
        x_t=torch.randn(n, 2, generator=g, dtype=torch.float64) * 1.5,
        x_next=torch.zeros(n, 2, dtype=torch.float64),
        step=torch.tensor([0, 2, 3, 4, 5]),  # includes the last step, where x̂0 = x_{t-1}
        cond=torch.zeros(n, dtype=torch.long),
        reward=torch.zeros(n),
        index=torch.arange(n),
    )
    names = [name for name, _ in task.policy.named_parameters()]

    def loss_of(*params):
        state = dict(zip(names, params, strict=True))
        original = task.policy
        task.policy = lambda x, t: functional_call(original, state, (x, t))
        try:
            return sqdf_loss(task, cells, cfg, SqdfParams(), torch.Generator().manual_seed(7))[0]
        finally:
            task.policy = original

    params = tuple(p.detach().clone().requires_grad_(True) for p in task.policy.parameters())
    assert torch.autograd.gradcheck(loss_of, params, eps=1e-6, atol=1e-5, rtol=1e-4)
