"""The sd task on SD 3/3.5: tiny random-initialised parts of the real classes (CLIP-L and
CLIP-G with their projections, T5 with a real T5 tokenizer, an SD3Transformer2DModel shaped
like SD 3.5 Medium's, SD3's VAE factors and FlowMatchEulerDiscreteScheduler), each piece
checked against diffusers' StableDiffusion3Pipeline doing the same thing its own way."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sqdf.core.flow import flow_sigmas
from sqdf.core.kernel import FlowKernel
from sqdf.errors import ConfigError
from sqdf.rewards.clip_rewards import convert_aesthetic_head
from sqdf.tasks import build_task
from sqdf.tasks.sd_family import FAMILIES, absent_components
from sqdf.tasks.sd_random import (
    write_random_aesthetic_head,
    write_random_clip,
    write_random_sd3,
)
from sqdf.training.trainer import train
from tests.tasks.sd_runs import (
    checkpointing_keeps_the_gradient,
    copy_model,
    distilled_x0_is_one_call,
    doc_lines,
    edit_json,
    every_method_runs_through_compare,
    held_out_drawn_again,
    held_out_numbers_are_the_images,
    reloaded_lora_matches_the_run,
    reward_defaults,
    run_doc_lines,
    sd_config,
    sd_settings,
)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    write_random_sd3(root / "sd3")
    write_random_sd3(root / "sd3_no_t5", t5=False)
    write_random_sd3(root / "turbo", t5=False, seed=1)  # a few-step distilled model's stand-in
    write_random_clip(root / "clip")
    write_random_aesthetic_head(root / "head.pth", in_dim=16)
    convert_aesthetic_head(root / "head.pth", root / "head.safetensors")
    return root


@pytest.fixture(scope="module")
def trained(parts, tmp_path_factory):
    """A 2-update run on the SD3 folder (its final/ holds the LoRA)."""
    return train(config(parts), tmp_path_factory.mktemp("sd3_run") / "run", progress=False)


def config(parts, model="sd3", **over):
    return sd_config(parts / model, parts, **over)


def pipeline(parts, model="sd3"):
    """A plain StableDiffusion3Pipeline, loaded as a user would (without T5: text_encoder_3
    and tokenizer_3 None, as diffusers documents it)."""
    from diffusers import StableDiffusion3Pipeline

    folder = parts / model
    absent = {c: None for c in absent_components(folder, FAMILIES["sd3"])}
    return StableDiffusion3Pipeline.from_pretrained(str(folder), local_files_only=True, **absent)


def pipeline_velocity(pipe, x, sigma, pos, pooled, neg=None, neg_pooled=None, guidance=1.0):
    """The pipeline loop's guided transformer output at sigma (B,): its timestep is the
    scheduler's, sigma · num_train_timesteps."""
    t = sigma * pipe.scheduler.config.num_train_timesteps
    with torch.no_grad():
        c = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=pos,
                             pooled_projections=pooled).sample  # fmt: skip
        if neg is None:
            return c
        u = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=neg,
                             pooled_projections=neg_pooled).sample  # fmt: skip
    return u + guidance * (c - u)


def test_family_sizes_and_time_grid_are_sd3s(parts):
    task = build_task(config(parts, num_steps=6))
    assert task.family.name == "sd3" and task.family.pipeline == "StableDiffusion3Pipeline"
    assert task.sample_shape == (16, 8, 8)  # 16 latent channels at the native 8 (16 px)
    assert isinstance(task.kernel, FlowKernel) and task.kernel.noise_level == 0.7
    assert task.kernel.noise_level_end is None  # one level unless a schedule is asked for
    scheduled = build_task(config(parts, num_steps=6, task_params={"noise_level_end": 0.3}))
    torch.testing.assert_close(scheduled.kernel.levels, torch.linspace(0.7, 0.3, 6).double())
    pipe = pipeline(parts)
    pipe.scheduler.set_timesteps(6)
    torch.testing.assert_close(task.kernel.sigmas, pipe.scheduler.sigmas, rtol=0, atol=0)
    # the grid is SD3's shift 3 (sqdf.core.flow's own construction of the scheduler's grid)
    torch.testing.assert_close(task.kernel.sigmas, flow_sigmas(6, shift=3.0), rtol=0, atol=0)
    k = torch.arange(6)
    times = task.kernel.model_time(k) * task.time_scale
    torch.testing.assert_close(times, pipe.scheduler.timesteps, rtol=0, atol=0)
    assert bool((task.kernel.stds > 0).all())  # every step stochastic: a finite KL


def test_a_dynamic_shift_is_the_one_the_pipeline_computes_for_the_image(parts, tmp_path):
    model = tmp_path / "dynamic"
    shutil.copytree(parts / "sd3", model)
    edit_json(model / "scheduler" / "scheduler_config.json", use_dynamic_shifting=True)
    task = build_task(config(parts, task_params={"model": str(model), "resolution": 32}))
    pipe = pipeline(parts)
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    pipe("a cat", num_inference_steps=4, height=32, width=32, output_type="latent")
    assert task.kernel.sigmas[1] != flow_sigmas(4, shift=3.0)[1]  # another grid than shift 3
    torch.testing.assert_close(task.kernel.sigmas, pipe.scheduler.sigmas, rtol=0, atol=0)


@pytest.mark.parametrize("model", ["sd3", "sd3_no_t5"])
@pytest.mark.parametrize("negative", ["blurry", ""])
def test_conditioning_and_guidance_match_the_sd3_pipeline(parts, model, negative):
    task = build_task(config(parts, model, task_params={"negative_prompt": negative}))
    pipe = pipeline(parts, model)
    assert (pipe.text_encoder_3 is None) == (model == "sd3_no_t5")
    cond = torch.tensor([3, 0])
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        task.prompts_of(cond), None, None, device="cpu", do_classifier_free_guidance=True,
        negative_prompt=[negative] * 2 if negative else None,
    )  # fmt: skip
    assert pos.shape == (2, 77 + 256, 96) and pooled.shape == (2, 32)
    text = task.text
    for ours, theirs in zip(text.rows(cond) + text.rows(cond, negative=True),
                            (pos, pooled, neg, neg_pooled), strict=True):  # fmt: skip
        torch.testing.assert_close(ours, theirs)  # encoded 32 at a time, theirs 2
    assert len(text.negative_embeds) == 1  # one negative for every prompt, stored once
    # without T5 its 256 rows are zeros; with it, not
    assert bool((pos[:, 77:] == 0).all()) == (model == "sd3_no_t5")
    # CFG as the pipeline's loop does it, at its timestep sigma · 1000
    x = torch.randn((2, *task.sample_shape), generator=torch.Generator().manual_seed(0))
    sigma = task.kernel.model_time(torch.tensor([0, 2]))
    with torch.no_grad():
        ours = task.model_output(x, sigma, cond, policy=False)
    want = pipeline_velocity(pipe, x, sigma, pos, pooled, neg, neg_pooled, guidance=3.0)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)


def test_added_prompts_are_encoded_as_the_pipeline_does(parts):
    task = build_task(config(parts))
    cond = task.add_prompts([("an owl", None), ("a crab", "dark")])  # held-out evaluation's
    assert cond.tolist() == [len(task.prompts) - 2, len(task.prompts) - 1]
    pipe = pipeline(parts)
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        ["an owl", "a crab"], None, None, device="cpu", negative_prompt=["", "dark"]
    )
    kwargs = task.text.guided_kwargs(cond)
    torch.testing.assert_close(kwargs["encoder_hidden_states"], torch.cat([neg, pos]))
    torch.testing.assert_close(kwargs["pooled_projections"], torch.cat([neg_pooled, pooled]))


def test_the_deterministic_step_is_the_schedulers_euler_step_on_the_same_call(parts):
    """At a vanishing noise level the SDE step is the Euler ODE step the pipeline takes
    (FlowMatchEulerDiscreteScheduler.step); at 0.7 it keeps the Euler step's mean plus
    Flow-GRPO's drift correction, with the same model call."""
    near_ode = build_task(config(parts, task_params={"noise_level": 1e-6}))
    sde = build_task(config(parts))
    pipe = pipeline(parts)
    sched = pipe.scheduler
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(2)
    cond = torch.tensor([1, 4])
    for k, t in enumerate(sched.timesteps):
        x = torch.randn((2, *near_ode.sample_shape), generator=g)
        ks = torch.full((2,), k)
        with torch.no_grad():
            out = near_ode.model_output(x, near_ode.model_time(ks, x), cond, policy=False)
        euler = sched.step(out, t, x).prev_sample
        mean, std = near_ode.kernel.step(out, x, ks)
        torch.testing.assert_close(mean, euler, rtol=1e-5, atol=1e-5)
        assert float(std.max()) < 1e-5
        # the SDE's mean differs from the Euler step by σ²/(2t) (x + (1 - t) v) Δ
        s, s_next = float(sched.sigmas[k]), float(sched.sigmas[k + 1])
        mean, std = sde.kernel.step(out, x, ks)
        cap = float(sched.sigmas[1]) if s >= 1 else s
        var = 0.7**2 * s / (1 - cap)
        torch.testing.assert_close(
            mean, euler + var / (2 * s) * (x + (1 - s) * out) * (s_next - s), rtol=1e-4, atol=1e-5
        )
        assert torch.allclose(std, torch.tensor(var * (s - s_next)).sqrt(), rtol=1e-5, atol=0)


def test_x0_is_the_flows_posterior_mean_and_decoding_is_the_pipelines(parts):
    task = build_task(config(parts))
    x = torch.randn((2, *task.sample_shape), generator=torch.Generator().manual_seed(3))
    k, cond = torch.tensor([1, 3]), torch.tensor([0, 2])
    with torch.no_grad():
        v = task.model_output(x, task.model_time(k, x), cond, policy=False)
        sigma = task.kernel.sigmas[k].view(-1, 1, 1, 1)
        torch.testing.assert_close(task.reference_x0(x, k, cond), x - sigma * v)
        # the pipeline's decode: latents / scaling_factor + shift_factor
        vae = task.vae.config
        assert (vae.scaling_factor, vae.shift_factor) == (1.5305, 0.0609)
        want = task.vae.decode(x / vae.scaling_factor + vae.shift_factor).sample
        torch.testing.assert_close(task.decode(x), (want / 2 + 0.5).clamp(0, 1))


def test_two_updates_change_the_lora_and_a_plain_sd3_pipeline_loads_it(parts, trained):
    final = load_file(str(trained / "final" / "policy.safetensors"))
    assert final and all(".default." in k for k in final)
    assert any(float(v.abs().max()) > 0 for k, v in final.items() if "lora_B" in k)
    # the peft defaults of diffusers' SD3 LoRA script: every attention's q, k, v and output
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in final} == {"to_q", "to_k", "to_v", "0"}
    assert any(".attn2." in k for k in final)  # SD 3.5's second attention too

    task = build_task(config(parts, task_params={"guidance": 1.0}))  # unguided, as compared
    task.policy.load_state_dict(final)
    pipe = pipeline(parts)
    x = torch.randn((2, *task.sample_shape), generator=torch.Generator().manual_seed(1))

    def image():
        return pipe(["a cat"], num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    reloaded_lora_matches_the_run(pipe, task, trained / "final", pipeline_velocity, image, x, 16)


def test_sample_renders_an_sd3_run_with_the_sd3_pipeline(parts, trained, tmp_path, monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    from sqdf.cli import main

    calls, real_call = [], StableDiffusion3Pipeline.__call__

    def recording(pipe, prompt, **kw):
        calls.append((kw["num_inference_steps"], kw["guidance_scale"]))
        return real_call(pipe, prompt, **kw)

    monkeypatch.setattr(StableDiffusion3Pipeline, "__call__", recording)
    grid = tmp_path / "grid.png"
    argv = ["sample", "--task", "sd", "--model", str(parts / "sd3"), "--lora",
            str(trained / "final"), "--num-samples", "2", "--device", "cpu",
            "--out", str(grid)]  # fmt: skip
    assert main(argv) == 0 and grid.stat().st_size > 500
    assert calls == [(4, 3.0)] * 4  # the run's 4 steps and CFG 3; reference and fine-tuned


def test_eval_scores_an_sd3_run_on_held_out_prompts(trained):
    """sqdf eval of an SD 3 run against its held-out images drawn again: the rewards, the
    path KL, the diversity and the Fréchet distance recomputed from them."""
    from sqdf.cli import main
    from sqdf.evaluation.evaluate import EVAL_SEED

    assert main(["eval", str(trained), "--per-prompt", "2", "--no-progress"]) == 0
    metrics = json.loads((trained / "eval.json").read_text())
    held_out_numbers_are_the_images(metrics, held_out_drawn_again(trained, 2, EVAL_SEED))


def test_every_method_and_best_of_n_run_through_compare(parts, tmp_path):
    # a batch of 4: grpo's default groups of 4 samples per prompt fill it
    base = sd_settings(parts / "sd3", parts, steps=1, batch_size=4)
    every_method_runs_through_compare(base, tmp_path)


@pytest.mark.parametrize("estimator", ["tweedie", "consistency"])
def test_checkpointing_gives_the_same_gradient_with_the_adapter_switched_in_the_loss(
    parts, estimator
):
    lcm = {"lcm": str(parts / "turbo")} if estimator == "consistency" else {}
    checkpointing_keeps_the_gradient(
        lambda on: config(
            parts, estimator=estimator, task_params={"gradient_checkpointing": on, **lcm}
        )
    )


def test_a_distilled_transformer_is_the_consistency_estimator(parts, tmp_path):
    turbo = pipeline(parts, "turbo")  # its pipeline runs it without CFG, as SD 3.5 Large Turbo
    for lcm in (parts / "turbo", parts / "turbo" / "transformer"):  # pipeline or its transformer
        task = build_task(config(parts, estimator="consistency", task_params={"lcm": str(lcm)}))
        distilled_x0_is_one_call(task, lambda *a: pipeline_velocity(turbo, *a))
    run = train(config(parts, estimator="consistency", task_params={"lcm": str(lcm)}),
                tmp_path / "run", progress=False)  # fmt: skip
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    # with another estimator its billions of parameters are not loaded, and it says so
    with pytest.warns(UserWarning, match="is not loaded: estimator tweedie does not read"):
        task = build_task(config(parts, task_params={"lcm": str(lcm)}))
    assert task._consistency_net is None


def test_a_consistency_model_that_is_not_a_fitting_transformer_is_refused(parts, tmp_path):
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"")
    other = _copy(parts, tmp_path, "turbo")
    edit_json(other / "transformer" / "config.json", _class_name="FluxTransformer2DModel")
    wide = _copy(parts, tmp_path / "wide", "turbo")
    edit_json(wide / "transformer" / "config.json", joint_attention_dim=4096)
    cases = [
        (lora, "lora.safetensors is a file; for SD 3/3.5 the consistency model is a few-step "
               "distilled SD3Transformer2DModel folder (or its pipeline's folder), not a LoRA"),
        (other, "turbo/transformer holds a FluxTransformer2DModel; a consistency model for "
                "SD 3/3.5 is a SD3Transformer2DModel folder"),
        (tmp_path / "wide", "holds no diffusers model (no config.json)"),
        (wide, "does not fit this SD 3/3.5 transformer: its joint_attention_dim is 4096, the "
               "model's 96"),
    ]  # fmt: skip
    for lcm, expected in cases:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            build_task(config(parts, estimator="consistency", task_params={"lcm": str(lcm)}))


def _copy(parts, tmp_path, name="sd3"):
    return copy_model(parts, tmp_path, name)


def test_model_picks_the_family_and_an_unknown_transformer_is_one_line(parts, tmp_path, capsys):
    from sqdf.cli import main

    assert main(["train", "--task", "sd", "--model", str(parts / "sd3"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model: SD 3/3.5 (StableDiffusion3Pipeline)" in out
    assert "D = 1,024 dimensions (16 x 8 x 8)" in out
    flux = _copy(parts, tmp_path)
    edit_json(flux / "model_index.json", transformer=["diffusers", "FluxTransformer2DModel"])
    other = _copy(parts, tmp_path, "sd3_no_t5")
    edit_json(other / "transformer" / "config.json", _class_name="SD3ControlNetModel")
    no_t5 = _copy(parts, tmp_path / "t5")
    shutil.rmtree(no_t5 / "text_encoder_3")
    pipeline_other = _copy(parts, tmp_path / "other")
    edit_json(pipeline_other / "model_index.json", _class_name="StableDiffusion3Img2ImgPipeline")
    heun = _copy(parts, tmp_path / "heun")
    edit_json(
        heun / "scheduler" / "scheduler_config.json", _class_name="FlowMatchHeunDiscreteScheduler"
    )
    cases = [
        (flux, "sd3/transformer is a FluxTransformer2DModel; a StableDiffusion3Pipeline "
               "folder's is a SD3Transformer2DModel"),
        (other, "transformer is a SD3ControlNetModel; a StableDiffusion3Pipeline"),
        (no_t5, 'missing text_encoder_3/); a folder without text_encoder_3/ says '
                '"text_encoder_3": [null, null] in model_index.json'),
        (pipeline_other, "holds a StableDiffusion3Img2ImgPipeline; supported: "
                         "StableDiffusionPipeline (SD 1.x/2.x), StableDiffusionXLPipeline (SDXL), "
                         "StableDiffusion3Pipeline (SD 3/3.5), FluxPipeline (FLUX.1)"),
        (heun, "scheduler is a FlowMatchHeunDiscreteScheduler; sqdf steps SD 3/3.5 through the "
               "time grid of a FlowMatchEulerDiscreteScheduler"),
    ]  # fmt: skip
    for folder, expected in cases:
        assert main(["train", "--task", "sd", "--model", str(folder), "--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize(
    "over,expected",
    [
        ({"eta": 0.5}, "eta is DDIM's; the flow SDE's noise (SD 3/3.5) is task_params.noise_level"),
        (
            {"estimator": "consistency"},
            "estimator consistency needs task_params.lcm (a few-step "
            "distilled SD3Transformer2DModel folder, e.g. SD 3.5 Large Turbo's",
        ),
        ({"task_params": {"finetune": "full"}}, "SD 3/3.5 trains a LoRA only"),
        ({"task_params": {"noise_level": 0.0}}, "sd noise_level must be > 0"),
    ],
)
def test_settings_that_do_not_apply_to_sd3_are_refused(parts, over, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        build_task(config(parts, **over))


def test_a_resolution_off_the_patch_grid_is_refused(parts, tmp_path):
    model = _copy(parts, tmp_path)  # an 8x VAE, as SD3's: 2x2 patches of latents of 1/8 side
    edit_json(model / "vae" / "config.json", block_out_channels=[8, 16, 16, 16])
    with pytest.raises(ConfigError, match=re.escape("sd resolution 520 is not a multiple of 16 "
                                                    "(VAE 8 × patch 2)")):  # fmt: skip
        build_task(config(parts, task_params={"model": str(model), "resolution": 520}))


def test_noise_level_on_a_ddim_family_is_refused(tmp_path):
    from sqdf.tasks.sd import SDConfig

    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / name).mkdir()
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ConfigError, match="noise_level_end are the flow SDE's .* noise is --eta"):
        SDConfig(model=str(tmp_path), noise_level=0.5)
    with pytest.raises(ConfigError, match="noise_level_end are the flow SDE's .* noise is --eta"):
        SDConfig(model=str(tmp_path), noise_level_end=0.5)


def test_sd3_guide_commands_run_on_tiny_parts(parts, tmp_path, monkeypatch):
    """The page's commands by Hub id, against a stand-in Hub serving the tiny parts."""
    lines = doc_lines("docs/guides/sd3.md", "--model stabilityai/stable-diffusion-3.5-medium ")
    assert len(lines) == 3 and all("resolution=512" in lines[i] for i in (0, 2))
    for i in (0, 2):  # 512 px through the tiny 2x VAE: too big here
        lines[i] = lines[i].replace("=512", "=32")
    turbo = "stabilityai/stable-diffusion-3.5-large-turbo/transformer"
    repos = {"stabilityai/stable-diffusion-3.5-medium": parts / "sd3",
             "stabilityai/stable-diffusion-3.5-large": parts / "sd3",
             turbo: parts / "turbo" / "transformer", **reward_defaults(parts)}  # fmt: skip
    monkeypatch.chdir(tmp_path)
    run_doc_lines(lines, repos, tmp_path, monkeypatch)
    assert turbo in json.loads((tmp_path / "runs/sd3-turbo-q/config.json").read_text())["weights"]
    config = json.loads((tmp_path / "runs/sd3/config.json").read_text())
    assert config["train"]["task_params"]["resolution"] == 32
    assert (tmp_path / "runs/sd3/final/pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "runs/sd3/grid.png").is_file()
    config = json.loads((tmp_path / "runs/sd3-turbo-q/config.json").read_text())
    assert config["train"]["estimator"] == "consistency"
    assert (tmp_path / "runs/sd3-turbo-q/final/pytorch_lora_weights.safetensors").is_file()


def test_cfg_detach_uncond_lets_the_gradient_through_the_prompts_pass_only(parts):
    # out = u + w (c - u): with u detached the gradient is w ∂c, Flow-GRPO's training CFG
    # (scripts/train_sd3.py:190); ∂c alone is the unguided output's gradient
    torch.manual_seed(0)
    task = build_task(config(parts, task_params={"guidance": 3.0, "lora_init": "gaussian"}))
    with torch.no_grad():
        for p in task.policy.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)  # B away from 0: every LoRA weight has a gradient
    x = torch.randn((2, *task.sample_shape), generator=torch.Generator().manual_seed(0))
    sigma = task.kernel.model_time(torch.tensor([0, 2]))
    cond = torch.tensor([3, 0])
    weights = torch.randn((2, *task.sample_shape), generator=torch.Generator().manual_seed(1))
    params = [p for p in task.policy.parameters() if p.requires_grad]

    def grads(**options):
        task.options = dataclasses.replace(task.options, **options)
        out = task.model_output(x, sigma, cond, policy=True)
        return torch.autograd.grad((out * weights).sum(), params)

    full = grads(guidance=3.0, cfg_detach_uncond=False)
    detached = grads(guidance=3.0, cfg_detach_uncond=True)
    prompt_only = grads(guidance=1.0, cfg_detach_uncond=False)
    for d, c in zip(detached, prompt_only, strict=True):
        torch.testing.assert_close(d, 3.0 * c, rtol=1e-4, atol=1e-6)
    pairs = zip(full, detached, strict=True)
    assert any(not torch.allclose(f, d, rtol=1e-3, atol=1e-6) for f, d in pairs)
