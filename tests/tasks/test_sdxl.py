"""The sd task on SDXL: tiny random-initialised parts of the real classes (both CLIP text
encoders, a UNet with SDXL's text-and-size conditioning), each piece checked against
diffusers' StableDiffusionXLPipeline doing the same thing its own way."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sqdf.errors import ConfigError
from sqdf.infra import weights
from sqdf.rewards.clip_rewards import convert_aesthetic_head
from sqdf.tasks import build_task
from sqdf.tasks.sd_family import FAMILIES
from sqdf.tasks.sd_random import (
    write_random_aesthetic_head,
    write_random_clip,
    write_random_lcm_lora,
    write_random_lcm_unet,
    write_random_sd,
)
from sqdf.training.trainer import train
from tests.tasks.sd_runs import (
    doc_lines,
    reward_defaults,
    run_doc_lines,
    sd_config,
    sd_pipeline,
    sd_settings,
)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    write_random_sd(root / "xl", "tiny-xl")
    write_random_lcm_unet(root / "lcm", "tiny-xl")
    write_random_clip(root / "clip")
    write_random_aesthetic_head(root / "head.pth", in_dim=16)
    convert_aesthetic_head(root / "head.pth", root / "head.safetensors")
    write_random_lcm_lora(root / "xl", root / "lcm_lora")
    write_random_sd(root / "sd15")  # another family, for the wrong-family LCM-LoRA
    write_random_lcm_lora(root / "sd15", root / "sd15_lora", seed=5)
    write_random_lcm_unet(root / "sd15_lcm")
    return root


def config(parts, **over):
    return sd_config(parts / "xl", parts, **over)


def pipeline(parts):
    return sd_pipeline(parts / "xl")


def test_family_is_read_from_model_index(parts):
    task = build_task(config(parts))
    assert task.family.name == "sdxl" and task.family.pipeline == "StableDiffusionXLPipeline"
    assert task.sample_shape == (4, 8, 8)  # the UNet's native 8 latents, 16 px


@pytest.mark.parametrize("negative", ["blurry", ""])
def test_conditioning_and_guidance_match_the_sdxl_pipeline(parts, negative):
    task = build_task(config(parts, task_params={"negative_prompt": negative}))
    pipe = pipeline(parts)
    cond = torch.tensor([3, 0])
    # the pipeline's own encoding: no negative prompt is None there (zeros for SDXL base)
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        task.prompts_of(cond), device="cpu", num_images_per_prompt=1,
        do_classifier_free_guidance=True, negative_prompt=[negative] * 2 if negative else None,
    )  # fmt: skip
    text = task.text
    for ours, theirs in zip(text.rows(cond) + text.rows(cond, negative=True),
                            (pos, pooled, neg, neg_pooled), strict=True):  # fmt: skip
        torch.testing.assert_close(ours, theirs)
    assert len(text.negative_embeds) == 1  # one negative for every prompt, stored once
    assert bool((neg == 0).all()) == (negative == "")
    ids = pipe._get_add_time_ids(
        (16, 16), (0, 0), (16, 16), dtype=torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )  # fmt: skip
    torch.testing.assert_close(text.time_ids, ids[0])
    # CFG as the pipeline's loop does it: negative and positive with their pooled and ids
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *task.sample_shape), generator=g)
    t = torch.tensor([901, 301])
    added = {"time_ids": ids.expand(2, -1)}
    with torch.no_grad():
        ours = task.model_output(x, t, cond, policy=False)
        u = pipe.unet(x, t, encoder_hidden_states=neg,
                      added_cond_kwargs={**added, "text_embeds": neg_pooled}).sample  # fmt: skip
        c = pipe.unet(x, t, encoder_hidden_states=pos,
                      added_cond_kwargs={**added, "text_embeds": pooled}).sample  # fmt: skip
    torch.testing.assert_close(ours, u + 3.0 * (c - u), rtol=1e-4, atol=1e-5)


def test_a_lower_resolution_conditions_on_its_size(parts):
    task = build_task(config(parts, task_params={"resolution": 32}))
    assert task.sample_shape == (4, 16, 16)
    assert task.text.time_ids.tolist() == [32, 32, 0, 0, 32, 32]


def test_one_reference_step_is_ddim_scheduler_step_on_the_same_unet_call(parts):
    from diffusers import DDIMScheduler

    task = build_task(config(parts))
    pipe = pipeline(parts)  # its folder ships an EulerDiscreteScheduler config, as SDXL base
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(2)
    cond = torch.tensor([1, 4])
    for k, t in enumerate(sched.timesteps):
        x, z = (torch.randn((2, *task.sample_shape), generator=g) for _ in range(2))
        ks = torch.full((2,), k)
        assert bool((task.kernel.model_time(ks) == t).all())
        with torch.no_grad():
            out = task.model_output(x, task.kernel.model_time(ks), cond, policy=False)
        mean, std = task.kernel.step(out, x, ks)
        expected = sched.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
        torch.testing.assert_close(mean + std * z, expected, rtol=1e-5, atol=1e-5)


def test_two_updates_change_the_lora_and_a_plain_sdxl_pipeline_loads_it(parts, tmp_path):
    lcm = {"lcm": str(parts / "lcm_lora" / "pytorch_lora_weights.safetensors")}
    run = train(config(parts, estimator="consistency", task_params=lcm), tmp_path / "run",
                progress=False)  # fmt: skip
    final = load_file(str(run / "final" / "policy.safetensors"))
    assert final and all(".default." in k for k in final)
    assert any(float(v.abs().max()) > 0 for k, v in final.items() if "lora_B" in k)

    task = build_task(config(parts))
    task.policy.load_state_dict(final)
    pipe = pipeline(parts)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, *task.sample_shape), generator=g)
    t, cond = torch.tensor([500, 40]), torch.tensor([1, 2])
    kwargs = task.text.unet_kwargs(cond)
    with torch.no_grad():
        before = pipe.unet(x, t, **kwargs).sample
        pipe.load_lora_weights(str(run / "final"))
        after = pipe.unet(x, t, **kwargs).sample
        ours = task.unet(x, t, **kwargs).sample
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ours, rtol=1e-4, atol=1e-5)
    image = pipe(["a cat"], num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def test_lcm_lora_x0_is_the_pipelines_lcm_unet_and_has_a_gradient(parts):
    from sqdf.core.x0 import consistency_x0

    path = parts / "lcm_lora" / "pytorch_lora_weights.safetensors"
    task = build_task(config(parts, estimator="consistency", task_params={"lcm": str(path)}))
    pipe = pipeline(parts)
    pipe.load_lora_weights(str(parts / "lcm_lora"))
    x = torch.randn((2, *task.sample_shape), generator=torch.Generator().manual_seed(3))
    t, cond = torch.tensor([600, 100]), torch.tensor([2, 7])
    abar = task.schedule.abar(t).view(-1, 1, 1, 1)
    with torch.no_grad():
        out = pipe.unet(x, t, **task.text.unet_kwargs(cond)).sample
    want = consistency_x0(out, x, abar, t.view(-1, 1, 1, 1))
    x = x.requires_grad_(True)
    got = task.consistency_x0(x, t, cond)
    torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(got.square().sum(), x)
    assert torch.isfinite(grad).all() and float(grad.abs().max()) > 0


def test_lcm_unet_folder_gets_the_sdxl_conditioning(parts):
    from diffusers import UNet2DConditionModel

    from sqdf.core.x0 import consistency_x0, guidance_embedding

    params = {"lcm": str(parts / "lcm"), "lcm_guidance": 6.0}
    task = build_task(config(parts, estimator="consistency", task_params=params))
    lcm = UNet2DConditionModel.from_pretrained(str(parts / "lcm"))
    x = torch.randn((2, *task.sample_shape), generator=torch.Generator().manual_seed(4))
    t, cond = torch.tensor([759, 259]), torch.tensor([0, 5])
    abar = task.schedule.abar(t).view(-1, 1, 1, 1)
    with torch.no_grad():
        out = lcm(x, t, timestep_cond=guidance_embedding(torch.full((2,), 5.0), 16),
                  **task.text.unet_kwargs(cond)).sample  # fmt: skip
        torch.testing.assert_close(
            task.consistency_x0(x, t, cond), consistency_x0(out, x, abar, t.view(-1, 1, 1, 1))
        )


def test_float16_decodes_in_float32_as_the_sdxl_pipeline_does(parts):
    task = build_task(config(parts, task_params={"dtype": "float16"}))
    assert task.vae_upcast and next(task.vae.parameters()).dtype == torch.float32
    with torch.no_grad():  # activations past float16's range (65,504) inside the decoder
        task.vae.decoder.conv_in.weight.mul_(3e4)
    latents = torch.randn((2, *task.sample_shape), generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(task.decode(latents)).all()
    half = task.vae.to(torch.float16)  # what decoding in the weights' dtype would give
    with torch.no_grad():
        raw = half.decode(latents.half() / half.config.scaling_factor).sample
    assert not torch.isfinite(raw).all()


def test_an_sd15_lcm_lora_or_lcm_unet_on_sdxl_is_one_clear_error(parts):
    wrong = {"lcm": str(parts / "sd15_lora" / "pytorch_lora_weights.safetensors")}
    with pytest.raises(ConfigError, match=r"does not fit this SDXL UNet: \d+ of its \d+ LoRA"):
        build_task(config(parts, estimator="consistency", task_params=wrong))
    wrong = {"lcm": str(parts / "sd15_lcm")}
    with pytest.raises(ConfigError, match="sd15_lcm does not fit this SDXL UNet: its "
                                          "cross_attention_dim is 32, the model's 64"):  # fmt: skip
        build_task(config(parts, estimator="consistency", task_params=wrong))


def test_a_lora_of_sd15_width_is_named_as_made_for_sd15(parts):
    from diffusers import StableDiffusionXLPipeline

    from sqdf.tasks.sd_family import check_lora_fits

    path = parts / "lcm_lora" / "pytorch_lora_weights.safetensors"
    state, _ = StableDiffusionXLPipeline.lora_state_dict(str(path))
    wide = {k: torch.zeros(4, 768) if "attn2.to_k.lora.down" in k else v
            for k, v in state.items()}  # fmt: skip
    task = build_task(config(parts))
    check_lora_fits(state, task.unet, path, "SDXL")  # its own LoRA fits
    with pytest.raises(ConfigError, match=r"fit this SDXL UNet: .*; it looks made for SD 1.x"):
        check_lora_fits(wide, task.unet, path, "SDXL")


@pytest.mark.parametrize("family", ["xl", "sd15"])
def test_a_tokenizer_without_a_length_is_one_line_naming_the_fix(parts, tmp_path, family):
    model = tmp_path / family
    shutil.copytree(parts / family, model)
    config_file = model / "tokenizer" / "tokenizer_config.json"
    saved = json.loads(config_file.read_text())
    del saved["model_max_length"]
    config_file.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"tokenizer: the tokenizer has no usable model_max_le"
                                          r"ngth .* add \"model_max_length\": 77"):  # fmt: skip
        build_task(config(parts, task_params={"model": str(model)}))


def test_every_method_and_best_of_n_run_through_compare(parts, tmp_path):
    from sqdf.experiments.compare import compare
    from sqdf.methods import METHODS

    held_out = tmp_path / "held_out.txt"  # sd variants are scored on these, 4 images each
    held_out.write_text("an owl\na crab\n")
    # a batch of 4: grpo's default groups of 4 samples per prompt fill it
    base = sd_settings(parts / "xl", parts, steps=1, batch_size=4,
                       task_params={"eval_prompts": str(held_out)})  # fmt: skip
    methods = [*METHODS, "best_of_n"]
    out = compare(base, methods, 1, tmp_path / "cmp", best_of=2, progress=False)
    results = json.loads((out / "results.json").read_text())
    assert results["variants"] == methods
    runs = {r["variant"]: r for r in results["runs"]}
    assert all("diverged" not in r and r["reward_mean"] == r["reward_mean"] for r in runs.values())
    assert all(runs[m]["updates"] == 1 for m in METHODS)


def test_bbo_runs_on_sdxl(parts, tmp_path):
    from sqdf.bbo import BboConfig, run_method

    bbo = BboConfig(rounds=2, queries_per_round=2, updates_per_round=1, proxy_steps=2)
    rows = run_method(bbo, config(parts), "sqdf", 0, tmp_path / "bbo", progress=False)
    assert [r["queries"] for r in rows] == [2, 4]


def test_sample_renders_an_sdxl_run_at_its_resolution(parts, tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from sqdf.cli import main
    from sqdf.evaluation.render import trained_settings

    run = train(config(parts, steps=1, task_params={"resolution": 32}), tmp_path / "run",
                progress=False)  # fmt: skip
    assert trained_settings(run / "final").resolution == 32
    sides, real_call = [], StableDiffusionXLPipeline.__call__

    def recording(pipe, prompt, **kw):
        out = real_call(pipe, prompt, **kw)
        sides.append(tuple(out.images.shape[-2:]))
        return out

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", recording)
    grid = tmp_path / "grid.png"
    argv = ["sample", "--task", "sd", "--model", str(parts / "xl"), "--lora", str(run / "final"),
            "--num-samples", "2", "--num-steps", "2", "--device", "cpu",
            "--out", str(grid)]  # fmt: skip
    assert main(argv) == 0 and grid.stat().st_size > 1000
    assert sides == [(32, 32)] * 4  # reference and fine-tuned, 2 each, at the run's 32 px
    # the SDXL LoRA given with an SD 1.5 model: one line before anything is drawn
    capsys.readouterr()
    argv[4] = str(parts / "sd15")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "does not fit this" in err and "it looks made for" not in err  # tiny widths
    assert "Traceback" not in err and len(sides) == 4


def test_a_folder_without_model_index_is_known_by_its_layout(parts, tmp_path):
    from sqdf.tasks.sd_family import family_of

    for name, family in (("xl", "sdxl"), ("sd15", "sd")):
        shutil.copytree(parts / name, tmp_path / name)
        (tmp_path / name / "model_index.json").unlink()
        assert family_of(tmp_path / name).name == family
    task = build_task(config(parts, task_params={"model": str(tmp_path / "xl")}))
    assert task.text.pooled is not None and task.text.time_ids is not None
    # sqdf sample assembles the pipeline from the parts (diffusers' loader needs the index)
    from sqdf.cli import main

    for name in ("xl", "sd15"):
        grid = tmp_path / f"{name}.png"
        argv = ["sample", "--task", "sd", "--model", str(tmp_path / name), "--num-samples", "1",
                "--num-steps", "2", "--device", "cpu", "--out", str(grid)]  # fmt: skip
        assert main(argv) == 0 and grid.stat().st_size > 500


def test_decode_undoes_a_vaes_latent_mean_and_std_as_the_pipeline(parts, tmp_path):
    model = tmp_path / "xl"
    shutil.copytree(parts / "xl", model)
    vae_config = json.loads((model / "vae" / "config.json").read_text())
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 1.5, 1.0, 2.0]
    vae_config |= {"latents_mean": mean, "latents_std": std}
    (model / "vae" / "config.json").write_text(json.dumps(vae_config))
    task = build_task(config(parts, task_params={"model": str(model)}))
    latents = torch.randn((2, *task.sample_shape), generator=torch.Generator().manual_seed(6))
    # the pipeline's formula: latents * std / scaling_factor + mean, then decode
    scale = task.vae.config.scaling_factor
    plain = latents * torch.tensor(std).view(1, 4, 1, 1) / scale + torch.tensor(mean).view(
        1, 4, 1, 1
    )
    with torch.no_grad():
        want = (task.vae.decode(plain).sample / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(task.decode(latents), want)


def test_dry_run_names_the_family_and_sizes_sdxl(tmp_path, capsys):
    from sqdf.cli import main

    for sub in FAMILIES["sdxl"].components:
        (tmp_path / sub).mkdir()
    index = {"_class_name": "StableDiffusionXLPipeline"}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    # SDXL base: 1024 px through an 8x VAE
    unet = {"sample_size": 128, "in_channels": 4, "addition_embed_type": "text_time"}
    (tmp_path / "unet" / "config.json").write_text(json.dumps(unet))
    vae = {"block_out_channels": [128, 256, 512, 512]}
    (tmp_path / "vae" / "config.json").write_text(json.dumps(vae))
    assert main(["train", "--task", "sd", "--model", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model: SDXL (StableDiffusionXLPipeline)" in out
    assert "D = 65,536 dimensions (4 x 128 x 128)" in out
    assert "12.75 GiB of host memory" in out  # 1,024 x 51 x 65,536 x 4 bytes


def test_sdxl_guide_commands_run_on_tiny_parts(parts, tmp_path, monkeypatch):
    """The page's commands by Hub id, against a stand-in Hub serving the tiny parts."""
    lines = doc_lines("docs/guides/sdxl.md", "--model stabilityai/stable-diffusion-xl-base-1.0")
    assert len(lines) == 2 and "resolution=512" in lines[0]
    lines[0] = lines[0].replace("=512", "=32")  # 512 px through the tiny 2x VAE: too big here
    lora = "pytorch_lora_weights.safetensors"
    repos = {"stabilityai/stable-diffusion-xl-base-1.0": parts / "xl",
             f"latent-consistency/lcm-lora-sdxl/{lora}": parts / "lcm_lora" / lora,
             **reward_defaults(parts)}  # fmt: skip
    monkeypatch.chdir(tmp_path)
    run_doc_lines(lines, repos, tmp_path, monkeypatch)
    config = json.loads((tmp_path / "runs/sdxl/config.json").read_text())
    assert config["train"]["task_params"]["resolution"] == 32
    assert {weights.parse_hub_ref(g).repo for g in config["weights"]} == {
        "stabilityai/stable-diffusion-xl-base-1.0", "latent-consistency/lcm-lora-sdxl",
        "openai/clip-vit-large-patch14", "trl-lib/ddpo-aesthetic-predictor"}  # fmt: skip
    assert (tmp_path / "runs/sdxl/final/pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "runs/sdxl/grid.png").is_file()
