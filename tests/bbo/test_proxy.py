"""The proxy ensemble: its fit recovers a known function, its UCB is optimistic where the
members disagree, and fine-tuning gets a gradient through it."""

import math

import torch

from sqdf.bbo.proxy import ProxyEnsemble, ProxyReward


def known_function(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2.0 * x[:, 0]) + 0.5 * x[:, 1] ** 2


def fitted(n: int = 256, seed: int = 0) -> ProxyEnsemble:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 2), generator=g) * 4 - 2
    ens = ProxyEnsemble(2, members=4, hidden=64)
    ens.fit(x, known_function(x), g, steps=400, lr=1e-2, weight_decay=0.0)
    return ens


def test_fit_recovers_a_known_function_on_held_out_points():
    g = torch.Generator().manual_seed(1)
    x_test = torch.rand((512, 2), generator=g) * 4 - 2
    y_test = known_function(x_test)
    ens = ProxyEnsemble(2, members=4, hidden=64)
    with torch.no_grad():
        before = float((ens.mean_std(x_test)[0] - y_test).pow(2).mean())
    ens = fitted()
    with torch.no_grad():
        after = float((ens.mean_std(x_test)[0] - y_test).pow(2).mean())
    # the best constant predictor's error is the variance; the fit must explain most of it
    assert after < 0.05 * float(y_test.var())
    assert after < 0.05 * before


def test_ucb_is_optimistic_and_grows_away_from_the_data():
    ens = fitted()
    near = torch.rand((64, 2), generator=torch.Generator().manual_seed(2)) * 4 - 2
    far = near * 4.0  # up to 8 from the origin: no data there
    with torch.no_grad():
        mean_near, std_near = ens.mean_std(near)
        mean_far, std_far = ens.mean_std(far)
        ucb = ProxyReward(1.0, None, ens, lambda x: x)(far)
    assert bool((std_far > 0).all())
    assert torch.allclose(ucb, mean_far + std_far)
    assert bool((ucb > mean_far).all())
    assert float(std_far.mean()) > 3 * float(std_near.mean())


def test_a_sampled_member_is_that_member_and_gradients_reach_the_input():
    ens = fitted()
    x = torch.tensor([[0.3, -0.7], [1.2, 0.4]], requires_grad=True)
    member = ProxyReward(1.0, 2, ens, lambda v: v)(x)
    assert torch.allclose(member, ens.member_values(x)[2])
    member.sum().backward()
    # d/dx of a fit to sin(2 x0) + x1²/2 at these points: compare signs with the truth
    true_grad = torch.stack([2 * torch.cos(2 * x[:, 0]), x[:, 1]], 1).detach()
    assert bool((torch.sign(x.grad) == torch.sign(true_grad)).all())
    assert not any(p.requires_grad for p in ens.parameters())  # frozen after the fit
    assert math.isfinite(float(x.grad.abs().sum()))


def test_a_feature_dead_in_the_data_keeps_unit_scale():
    # a ReLU feature that is zero on every queried sample and on at a new one: standardised
    # by its (zero) spread it would be multiplied by 1e6 and swamp the prediction
    g = torch.Generator().manual_seed(3)
    x = torch.rand((64, 2), generator=g) * 4 - 2
    dead = torch.cat([x, torch.zeros((64, 1))], dim=1)
    ens = ProxyEnsemble(3, members=4, hidden=64)
    ens.fit(dead, known_function(x), g, steps=200, lr=1e-2, weight_decay=0.0)
    assert torch.equal(ens.x_std[2], torch.tensor(1.0))
    on = torch.cat([x[:8], torch.ones((8, 1))], dim=1)  # the dead feature at 1
    with torch.no_grad():
        assert float(ens.member_values(on).abs().max()) < 20  # targets lie in [-1, 2]
