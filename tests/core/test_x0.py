"""x̂0 estimators against diffusers: Tweedie = pred_original_sample; consistency = LCMScheduler."""

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler

from sqdf.core import consistency_x0, lcm_boundary_scalings, make_ddim_schedule, tweedie_x0
from sqdf.core.x0 import guidance_embedding


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


@pytest.mark.parametrize("scaling", [None, 4.0])
def test_consistency_x0_near_t0_with_lcms_defaults_and_another_scaling(scaling):
    """Near t = 0, where c_skip x_t counts (at the 8-step schedule's timesteps c_skip is below
    1e-6): LCMScheduler's denoised at timesteps down to 1, with its defaults (epsilon,
    timestep_scaling 10) called with ours, or both with timestep_scaling 4."""
    over = {} if scaling is None else {"timestep_scaling": scaling}
    lcm = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       clip_sample=False, set_alpha_to_one=False, **over)  # fmt: skip
    lcm.set_timesteps(timesteps=[999, 499, 3, 1])  # off its distillation grid: it warns
    g = torch.Generator().manual_seed(3)
    for t in lcm.timesteps:
        x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = lcm.step(out, t, x, generator=g).denoised
        got = consistency_x0(out, x, lcm.alphas_cumprod[t], torch.as_tensor(t), **over)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_consistency_x0_keeps_bfloat16_inputs_bfloat16_with_per_sample_timesteps():
    # c_skip and c_out come back in float32; (B, 1, 1, 1) of them would promote bf16 latents
    t = torch.tensor([1, 3]).view(-1, 1, 1, 1)
    abar = make_ddim_schedule(50).abar_t[:2].view(-1, 1, 1, 1).bfloat16()
    x, out = torch.randn(2, 2, 1, 4, 4, dtype=torch.bfloat16).unbind(0)  # (B, C, H, W) each
    assert consistency_x0(out, x, abar, t).dtype == torch.bfloat16


def test_boundary_scalings_match_lcm_and_the_boundary_condition():
    lcm = LCMScheduler()
    for t in [0, 1, 5, 50, 999]:
        c_skip, c_out = lcm_boundary_scalings(torch.tensor(t))
        e_skip, e_out = lcm.get_scalings_for_boundary_condition_discrete(t)
        assert float(c_skip) == pytest.approx(float(e_skip), rel=1e-6)
        assert float(c_out) == pytest.approx(float(e_out), rel=1e-6, abs=1e-12)
    c_skip, c_out = lcm_boundary_scalings(torch.tensor(0))
    assert (float(c_skip), float(c_out)) == (1.0, 0.0)  # f(x, 0) = x


@pytest.mark.parametrize("dim", [16, 7])
def test_guidance_embedding_is_the_lcm_pipelines(dim):
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([5.0, 0.5, 8.0])
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, dim)
    torch.testing.assert_close(guidance_embedding(w, dim), expected)
