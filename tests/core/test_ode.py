"""The probability-flow ODE solution against closed forms."""

import pytest
import torch

from sqdf.core import pf_ode_x0
from sqdf.core.gmm import GaussianMixture, gmm_posterior_mean


def single(m=(1.0, -2.0), s=0.5):
    return GaussianMixture(
        torch.ones(1, dtype=torch.float64),
        torch.tensor([m], dtype=torch.float64),
        torch.full((1, 2), s**2, dtype=torch.float64),
    )


@pytest.mark.parametrize("abar", [0.999, 0.5, 0.05, 1e-3])
def test_single_gaussian_flow_is_the_affine_transport_map(abar):
    # For x0 ~ N(m, s²I) the flow maps x_t to m + s / sqrt(a s² + 1 - a) (x_t - sqrt(a) m).
    gmm, s = single(), 0.5
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    a = torch.full((16,), abar, dtype=torch.float64)
    m = gmm.means[0]
    expected = m + s / (abar * s**2 + 1 - abar) ** 0.5 * (x - abar**0.5 * m)
    err = {
        n: float(
            (pf_ode_x0(lambda y, aa: gmm_posterior_mean(gmm, y, aa), x, a, n) - expected)
            .abs()
            .max()
        )
        for n in (24, 48)
    }
    assert err[48] < 0.025
    # Heun is second order: doubling the steps cuts the error about fourfold
    assert err[48] < err[24] / 3 or err[48] < 1e-4


def test_flow_carries_noise_to_the_mixture():
    gmm = GaussianMixture(
        torch.tensor([0.7, 0.3], dtype=torch.float64),
        torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64),
        torch.full((2, 2), 0.1, dtype=torch.float64),
    )
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    a = torch.full((4000,), 1e-4, dtype=torch.float64)
    x0 = pf_ode_x0(lambda y, aa: gmm_posterior_mean(gmm, y, aa), x_T, a, num_steps=24)
    frac_left = float((x0[:, 0] < 0).double().mean())
    assert frac_left == pytest.approx(0.7, abs=0.03)
    assert float(x0[x0[:, 0] < 0].std(0)[1]) == pytest.approx(0.1**0.5, rel=0.1)


def test_gradients_flow_through_the_solver():
    gmm = single()
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    a = torch.full((4,), 0.3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda z: pf_ode_x0(lambda y, aa: gmm_posterior_mean(gmm, y, aa), z, a, num_steps=4), (x,)
    )


def test_one_step_is_tweedie():
    gmm = GaussianMixture(
        torch.tensor([0.5, 0.5], dtype=torch.float64),
        torch.tensor([[-2.0, 1.0], [2.0, 1.0]], dtype=torch.float64),
        torch.full((2, 2), 0.2, dtype=torch.float64),
    )
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = torch.full((6,), 0.3, dtype=torch.float64)
    got = pf_ode_x0(lambda y, aa: gmm_posterior_mean(gmm, y, aa), x, a, num_steps=1)
    torch.testing.assert_close(got, gmm_posterior_mean(gmm, x, a))
