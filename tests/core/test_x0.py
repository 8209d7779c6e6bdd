"""x̂0 estimators against diffusers: Tweedie = pred_original_sample; consistency = LCMScheduler."""

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler

from sqdf.core import consistency_x0, lcm_boundary_scalings, make_ddim_schedule, tweedie_x0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_tweedie_equals_pred_original_sample(prediction_type):
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    sched.set_timesteps(50)
    ours = make_ddim_schedule(50)
    g = torch.Generator().manual_seed(1)
    for k, t in enumerate(sched.timesteps):
        x, out = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
        expected = sched.step(out, t, x, eta=0.0).pred_original_sample
        got = tweedie_x0(out, x, ours.abar_t[k], prediction_type)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_consistency_x0_equals_lcm_denoised(prediction_type):
    lcm = LCMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
    )
    lcm.set_timesteps(8)
    g = torch.Generator().manual_seed(2)
    for t in lcm.timesteps:
        x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = lcm.step(out, t, x, generator=g).denoised
        abar = lcm.alphas_cumprod[t]
        got = consistency_x0(out, x, abar, torch.as_tensor(t), prediction_type)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_boundary_scalings_match_lcm_and_the_boundary_condition():
    lcm = LCMScheduler()
    for t in [0, 1, 5, 50, 999]:
        c_skip, c_out = lcm_boundary_scalings(torch.tensor(t))
        e_skip, e_out = lcm.get_scalings_for_boundary_condition_discrete(t)
        assert float(c_skip) == pytest.approx(float(e_skip), rel=1e-6)
        assert float(c_out) == pytest.approx(float(e_out), rel=1e-6, abs=1e-12)
    c_skip, c_out = lcm_boundary_scalings(torch.tensor(0))
    assert (float(c_skip), float(c_out)) == (1.0, 0.0)  # f(x, 0) = x
