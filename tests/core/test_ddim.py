"""The DDIM Gaussian policy against diffusers' DDIMScheduler.step, step by step."""

import pytest
import torch
from diffusers import DDIMScheduler

from sqdf.core import ddim_step_mean_std, gaussian_kl, make_ddim_schedule

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
DDPM = dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def _pair(betas: dict, prediction_type: str, set_alpha_to_one: bool, steps_offset: int, eta: float):
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type=prediction_type,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=steps_offset,
        **betas,
    )
    sched.set_timesteps(50)
    ours = make_ddim_schedule(
        50, eta=eta, set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset, **betas
    )
    return sched, ours


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(
    "betas,set_alpha_to_one,steps_offset", [(SD, False, 1), (DDPM, True, 0), (DDPM, False, 1)]
)
def test_step_matches_diffusers_at_every_timestep(
    prediction_type, eta, betas, set_alpha_to_one, steps_offset
):
    sched, ours = _pair(betas, prediction_type, set_alpha_to_one, steps_offset, eta)
    assert torch.equal(ours.timesteps, sched.timesteps)
    g = torch.Generator().manual_seed(0)
    for k, t in enumerate(sched.timesteps):
        x = torch.randn(2, 4, 8, 8, generator=g)
        out = torch.randn(2, 4, 8, 8, generator=g)
        noise = torch.randn(2, 4, 8, 8, generator=g)
        expected = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        mean, std = ddim_step_mean_std(
            out, x, ours.abar_t[k], ours.abar_prev[k], eta, prediction_type
        )
        torch.testing.assert_close(mean + std * noise, expected, rtol=1e-5, atol=1e-5)


def test_default_schedule_keeps_every_step_stochastic():
    sched = make_ddim_schedule(50, eta=1.0)
    assert bool((sched.sigmas > 0).all())
    # the last step still has a finite KL
    mean = torch.zeros(3, 2)
    assert torch.isfinite(gaussian_kl(mean + 0.1, mean, sched.sigmas[-1])).all()


@pytest.mark.parametrize("kw", [dict(set_alpha_to_one=True), dict(steps_offset=0)])
def test_deterministic_last_step_is_refused_by_the_kl(kw):
    sched = make_ddim_schedule(50, eta=1.0, **kw)
    assert float(sched.sigmas[-1]) == 0.0
    with pytest.raises(ValueError, match="std > 0"):
        gaussian_kl(torch.ones(2, 2), torch.zeros(2, 2), sched.sigmas[-1])


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        make_ddim_schedule(0)
    with pytest.raises(ValueError, match="eta"):
        make_ddim_schedule(10, eta=1.5)
    with pytest.raises(ValueError, match="beta schedule"):
        make_ddim_schedule(10, beta_schedule="cosine")


def test_a_schedule_may_take_every_training_timestep():
    # num_steps up to num_train_timesteps (with steps_offset 0, the last one is t = 0)
    s = make_ddim_schedule(10, num_train_timesteps=10, steps_offset=0)
    assert s.timesteps.tolist() == list(range(9, -1, -1))
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 10\], got 11"):
        make_ddim_schedule(11, num_train_timesteps=10, steps_offset=0)
