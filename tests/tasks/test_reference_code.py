"""The settings that reproduce the SQDF reference code (docs/reproducing.md), on tiny random
SD parts, each against an independent computation: peft's LoRA init laws, diffusers'
LCMScheduler timesteps and boundary scalings, torchvision's Resize, the masked loss by hand."""

from __future__ import annotations

import math

import pytest
import torch

from sqdf.config.train_config import TrainConfig
from sqdf.core.x0 import nearest_timesteps
from sqdf.errors import ConfigError
from sqdf.methods import METHODS, build_method_params
from sqdf.tasks import build_task
from sqdf.tasks.lora import add_lora
from sqdf.tasks.sd import lcm_distilled_timesteps, reference_code_image
from sqdf.tasks.sd_random import write_random_lcm_unet
from tests.tasks.sd_runs import sd_config, write_tiny_parts


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = write_tiny_parts(tmp_path_factory.mktemp("sd"))
    write_random_lcm_unet(root / "lcm")
    return root


def config(parts, **over):
    return sd_config(parts / "sd", parts, **over)


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_lora_init_draws_a_as_peft_documents_and_b_zero(init):
    torch.manual_seed(0)
    fan_in, rank = 512, 4
    net = torch.nn.Sequential()
    net.add_module("to_q", torch.nn.Linear(fan_in, 256))
    add_lora(net, rank, float(rank), ["to_q"], init)
    a = net.to_q.lora_A["default"].weight.detach()
    b = net.to_q.lora_B["default"].weight.detach()
    assert float(b.abs().max()) == 0.0  # the policy starts as the reference
    if init == "gaussian":  # normal, std 1/rank (variance 1/rank^2)
        assert float(a.std()) == pytest.approx(1 / rank, rel=0.05)
    else:  # Kaiming-uniform, a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std bound/sqrt(3)
        bound = 1 / math.sqrt(fan_in)
        assert float(a.abs().max()) <= bound
        assert float(a.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_sd_task_takes_the_lora_init(parts):
    torch.manual_seed(0)
    task = build_task(config(parts, task_params={"lora_init": "gaussian"}))
    a = [p.detach() for n, p in task.unet.named_parameters() if "lora_A.default" in n]
    rank = task.options.lora_rank
    assert float(torch.cat([p.flatten() for p in a]).std()) == pytest.approx(1 / rank, rel=0.1)
    with pytest.raises(ConfigError, match="lora_init must be one of default, gaussian"):
        build_task(config(parts, task_params={"lora_init": "xavier"}))


def test_lcm_grid_is_diffusers_lcm_scheduler_timesteps_and_nearest_is_by_distance(parts):
    from diffusers import DDIMScheduler, LCMScheduler

    grid = lcm_distilled_timesteps(parts / "sd")
    # what the reference code takes: LCMScheduler from the pipeline's config, 50 steps
    lcm = LCMScheduler.from_pretrained(str(parts / "sd"), subfolder="scheduler")
    lcm.set_timesteps(50)
    assert torch.equal(grid, lcm.timesteps.long())
    assert grid.tolist() == list(range(999, 0, -20))  # 999, 979, ..., 19
    ddim = DDIMScheduler.from_pretrained(str(parts / "sd"), subfolder="scheduler")
    ddim.set_timesteps(50)
    chain = ddim.timesteps.long()  # 981, 961, ..., 1 (steps_offset 1)
    mapped = nearest_timesteps(chain, grid)
    brute = torch.tensor([min(grid.tolist(), key=lambda g: abs(g - int(t))) for t in chain])
    assert torch.equal(mapped, brute)
    assert int(mapped[-1]) == 19 and int(chain[-1]) == 1  # 18 apart at the last state
    assert int((mapped - chain).abs()[:-1].max()) == 2


def test_lcm_read_at_its_distilled_timestep_with_that_timesteps_scalings(parts):
    from diffusers import LCMScheduler, UNet2DConditionModel

    lcm_params = {"lcm": str(parts / "lcm"), "lcm_guidance": 6.0}
    distilled_params = {**lcm_params, "lcm_timesteps": "distilled"}
    distilled = build_task(config(parts, estimator="consistency", task_params=distilled_params))
    chain = build_task(config(parts, estimator="consistency", task_params=lcm_params))
    net = UNet2DConditionModel.from_pretrained(str(parts / "lcm"))
    sched = LCMScheduler.from_pretrained(str(parts / "sd"), subfolder="scheduler")
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *distilled.sample_shape), generator=g)
    t, cond = torch.tensor([961, 1]), torch.tensor([0, 3])
    t_lcm = torch.tensor([959, 19])
    from sqdf.core.x0 import guidance_embedding

    with torch.no_grad():
        out = net(x, t_lcm, encoder_hidden_states=distilled.text.embeds[cond],
                  timestep_cond=guidance_embedding(torch.full((2,), 5.0), 16)).sample  # fmt: skip
        # diffusers' own LCM step at t_lcm: denoised = c_out x̂0 + c_skip x with ᾱ(t_lcm)
        want = []
        for i in range(2):
            c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(int(t_lcm[i]))
            abar = sched.alphas_cumprod[int(t_lcm[i])]
            x0 = (x[i] - (1 - abar).sqrt() * out[i]) / abar.sqrt()
            want.append(c_out * x0 + c_skip * x[i])
        got = distilled.consistency_x0(x, t, cond)
        torch.testing.assert_close(got, torch.stack(want).float(), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, chain.consistency_x0(x, t, cond))


def test_reference_code_image_is_torchvisions_resize_of_the_twice_mapped_image():
    from torchvision.transforms import Resize

    g = torch.Generator().manual_seed(0)
    for shape in ((2, 3, 64, 64), (1, 3, 40, 72), (1, 3, 300, 256)):
        decoded = torch.rand(shape, generator=g)  # the decoder's image in [0, 1]
        want = Resize(224)(((decoded / 2) + 0.5).clamp(0, 1))
        got = reference_code_image(decoded)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert float(got.min()) >= 0.5 - 1e-6  # the reference's scorer never sees below 0.5


def test_compat_reward_input_is_the_vae_decode_mapped_twice_and_resized(parts):
    from diffusers import AutoencoderKL
    from torchvision.transforms import Resize

    compat = build_task(config(parts, task_params={"reference_compat": True}))
    x0 = torch.randn((2, *compat.sample_shape), generator=torch.Generator().manual_seed(1))
    vae = AutoencoderKL.from_pretrained(str(parts / "sd"), subfolder="vae")
    with torch.no_grad():
        image = vae.decode(x0 / vae.config.scaling_factor).sample
        postprocessed = (image / 2 + 0.5).clamp(0, 1)  # the pipeline's postprocess
        want = Resize(224)((postprocessed / 2 + 0.5).clamp(0, 1))  # aesthetic_loss_fn's
        torch.testing.assert_close(compat.trained_reward_input(x0), want, rtol=1e-4, atol=1e-5)
        # evaluation's input stays the decoded image, compat or not
        torch.testing.assert_close(compat.reward_input(x0), postprocessed, rtol=1e-4, atol=1e-5)


def test_a_compat_runs_evaluation_scores_the_true_image(parts):
    from sqdf.evaluation.evaluate import score_samples

    torch.manual_seed(0)
    compat = build_task(config(parts, task_params={"reference_compat": True}))
    torch.manual_seed(0)
    plain = build_task(config(parts))
    plain.policy.load_state_dict(compat.policy.state_dict())
    x0 = torch.randn((3, *compat.sample_shape), generator=torch.Generator().manual_seed(2))
    cond = torch.tensor([0, 1, 2])
    with torch.no_grad():
        trained = compat.reward(x0, cond)
        assert not torch.allclose(trained, plain.reward(x0, cond))  # the loss sees compat's
    torch.testing.assert_close(score_samples(compat, x0, cond), score_samples(plain, x0, cond))


def _cells(task, n=4):
    from sqdf.sampling.buffer import Cells

    g = torch.Generator().manual_seed(3)
    return Cells(
        x_t=torch.randn((n, *task.sample_shape), generator=g), x_next=None,
        step=torch.tensor([0, 1, 2, 1]), cond=torch.tensor([0, 1, 2, 3]),
        reward=torch.zeros(n), index=torch.arange(n),
    )  # fmt: skip


def test_positive_reward_mask_keeps_positive_q_cells_kl_included(parts, monkeypatch):
    task = build_task(config(parts))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B is zero at init (KL 0): moved, so that a masked KL shows
        for name, p in task.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    cfg = TrainConfig(**{**config(parts).to_dict(), "alpha": 0.5})
    q = torch.tensor([1.0, -2.0, 0.5, -0.1])
    monkeypatch.setattr(task, "soft_q", lambda x, step, cond, g: q + 0 * x.flatten(1).sum(1))
    cells = _cells(task)
    loss = METHODS["sqdf"].loss

    def run(**params):
        return loss(task, cells, cfg, build_method_params("sqdf", params),
                    torch.Generator().manual_seed(7))  # fmt: skip

    plain, stats = run()
    masked, _ = run(positive_reward_mask=True)
    # the same draws: per-cell loss -γ^(T-k-1) q + α KL, KL from the stats' mean is not per
    # cell, so rebuild each cell's loss from the plain run's pieces
    from sqdf.core.kl import gaussian_kl
    from sqdf.sampling.sampler import step_mean_std

    with torch.no_grad():
        mean, std = step_mean_std(task, cells.x_t, cells.step, cells.cond, policy=True)
        ref, _ = step_mean_std(task, cells.x_t, cells.step, cells.cond, policy=False)
    kl = gaussian_kl(mean, ref, std)
    weight = cfg.gamma ** (task.kernel.num_steps - 1 - cells.step).double()
    per_cell = -weight * q.double() + cfg.alpha * kl.double()
    assert float(plain) == pytest.approx(float(per_cell.mean()), rel=1e-5)
    keep = (q > 0).double()
    assert float(masked) == pytest.approx(float((per_cell * keep).mean()), rel=1e-5)
    # the KL is masked too: a mask on the reward term alone would give this, far from it
    reward_only = (-weight * q.double() * keep + cfg.alpha * kl.double()).mean()
    assert float(kl.min()) > 0
    assert abs(float(masked) - float(reward_only)) > 1e-3 * abs(float(masked))
    # reference_compat turns the mask on by itself
    compat = build_task(config(parts, task_params={"reference_compat": True}))
    compat.nets = task.nets
    compat.soft_q = task.soft_q
    got, _ = loss(compat, cells, cfg, build_method_params("sqdf", {}),
                  torch.Generator().manual_seed(7))  # fmt: skip
    assert float(got) == pytest.approx(float(masked), rel=1e-6)


def test_reference_compat_refuses_more_than_one_process():
    from types import SimpleNamespace

    from sqdf.training.start import check_reference_compat

    compat, plain = SimpleNamespace(reference_compat=True), SimpleNamespace()
    check_reference_compat(compat, 1)
    check_reference_compat(plain, 2)
    with pytest.raises(ConfigError, match="trains a separate LoRA per process; run it on one "
                                          "process, not 2"):  # fmt: skip
        check_reference_compat(compat, 2)


def test_tf32_is_set_either_way_by_each_task(parts, monkeypatch):
    import sqdf.tasks.sd as sd

    monkeypatch.setattr(sd, "tf32_applies", lambda device: True)  # as on CUDA
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        build_task(config(parts, task_params={"tf32": True}))
        assert torch.backends.cuda.matmul.allow_tf32 is True
        build_task(config(parts))  # a later task without tf32 does not inherit it
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_the_float16_loss_scale_starts_where_accelerates_does():
    from types import SimpleNamespace

    from sqdf.training.start import loss_scaler

    # accelerate's fp16 builds torch's GradScaler with its default init_scale
    scaler = loss_scaler(SimpleNamespace(dtype=torch.float16, device=torch.device("cpu")))
    assert scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale() == 2.0**16
