"""The per-step Gaussian KL against torch.distributions and a Monte-Carlo estimate."""

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from sqdf.core import alpha_in_sum_convention, gaussian_kl


def test_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mp, mq = (
        torch.randn(5, 3, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 3, 4, generator=g, dtype=torch.float64),
    )
    std = torch.rand(5, 1, 1, generator=g, dtype=torch.float64) + 0.1
    expected = kl_divergence(
        Independent(Normal(mp, std.expand_as(mp)), 2), Independent(Normal(mq, std.expand_as(mq)), 2)
    )
    torch.testing.assert_close(gaussian_kl(mp, mq, std), expected)


def test_matches_monte_carlo():
    g = torch.Generator().manual_seed(1)
    mp, mq, std = torch.tensor([[0.3, -0.2]]), torch.tensor([[0.0, 0.1]]), torch.tensor(0.5)
    x = mp + std * torch.randn(200_000, 2, generator=g)
    p, q = Independent(Normal(mp, std), 1), Independent(Normal(mq, std), 1)
    log_ratio = p.log_prob(x) - q.log_prob(x)
    se = float(log_ratio.std()) / len(x) ** 0.5
    assert float(log_ratio.mean()) == pytest.approx(float(gaussian_kl(mp, mq, std)), abs=4 * se)


def test_zero_std_is_an_error_not_a_division_by_zero():
    with pytest.raises(ValueError, match="std > 0"):
        gaussian_kl(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor(0.0))


def test_alpha_conversion_gives_the_weighted_kl_each_code_writes():
    # SQDF's reference code: alpha * mean((mu - mu_ref)^2 / sigma^2); Flow-GRPO: beta * mean of
    # the same with the 1/2. Converted, each equals alpha_sum times our exact summed KL.
    g = torch.Generator().manual_seed(2)
    mp, mq = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64).unbind(0)[:2]
    mp, mq = mp[None], mq[None]
    std = torch.tensor(0.3, dtype=torch.float64)
    dims = mp[0].numel()
    sq = (mp - mq).pow(2) / std**2
    written = {"mean": sq.mean(), "half_mean": (sq / 2).mean(), "sum": (sq / 2).sum()}
    for scale, term in written.items():
        alpha_sum = alpha_in_sum_convention(1.7, scale, dims)
        torch.testing.assert_close(alpha_sum * gaussian_kl(mp, mq, std)[0], 1.7 * term)
    with pytest.raises(ValueError, match="^unknown KL scale 'avg'; known: sum, mean, half_mean$"):
        alpha_in_sum_convention(1.0, "avg", dims)
    with pytest.raises(ValueError, match="^a sample needs at least one dimension, got 0$"):
        alpha_in_sum_convention(1.0, "mean", 0)
    assert alpha_in_sum_convention(1.0, "mean", 1) == 2.0  # one dimension is enough


def test_log_prob_and_the_kernels_are_torch_distributions():
    from sqdf.core import make_ddim_schedule
    from sqdf.core.kernel import DDIMKernel
    from sqdf.core.kl import gaussian_log_prob

    g = torch.Generator().manual_seed(4)
    x, mean = torch.randn(2, 3, 2, 4, generator=g, dtype=torch.float64).unbind(0)
    per_sample = torch.tensor([0.3, 1.7, 0.9], dtype=torch.float64).view(-1, 1, 1)
    for std in (torch.tensor(0.4, dtype=torch.float64), per_sample):
        expected = Independent(Normal(mean, std.expand_as(mean)), 2).log_prob(x)
        torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)
        kernel = DDIMKernel(make_ddim_schedule(10, eta=1.0))
        torch.testing.assert_close(kernel.log_prob(x, mean, std), expected)
