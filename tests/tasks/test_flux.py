"""The sd task on FLUX.1: tiny random-initialised parts of the real classes (CLIP-L, T5 with a
real T5 tokenizer, a FluxTransformer2DModel with and without the guidance embedding, FLUX's
VAE factors and FlowMatchEulerDiscreteScheduler with its dynamic shift), each piece checked
against diffusers' FluxPipeline doing the same thing its own way. CPU, float32."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sqdf.core.kernel import FlowKernel
from sqdf.errors import ConfigError
from sqdf.rewards.clip_rewards import convert_aesthetic_head
from sqdf.tasks import build_task
from sqdf.tasks.sd import FLUX_SAMPLE_SIZE
from sqdf.tasks.sd_flux import latent_ids, pack_latents, unpack_latents
from sqdf.tasks.sd_random import write_random_aesthetic_head, write_random_clip, write_random_flux
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

SIDE = 16  # pixels: 8×8 latents through the tiny 2× VAE, 4×4 = 16 packed tokens


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    write_random_flux(root / "flux")  # guidance-distilled, as FLUX.1-dev
    write_random_flux(root / "schnell", guidance_embeds=False)
    write_random_clip(root / "clip")
    write_random_aesthetic_head(root / "head.pth", in_dim=16)
    convert_aesthetic_head(root / "head.pth", root / "head.safetensors")
    return root


def config(parts, model="flux", **over):
    params = {"resolution": SIDE, **({"guidance": 1.0} if model == "schnell" else {})}
    over["task_params"] = params | over.get("task_params", {})
    return sd_config(parts / model, parts, **over)


@pytest.fixture(scope="module")
def trained(parts, tmp_path_factory):
    """A 2-update run on the FLUX.1-dev-like folder (its final/ holds the LoRA)."""
    return train(config(parts), tmp_path_factory.mktemp("flux_run") / "run", progress=False)


def pipeline(parts, model="flux"):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(parts / model), local_files_only=True)


def pipeline_velocity(pipe, x, sigma, pos, pooled, guidance=3.0):
    """The pipeline loop's transformer call on unpacked latents x (B, C, H, W) at sigma (B,):
    its latents packed, its timestep the scheduler's (sigma · 1000) divided by 1000, its
    guidance tensor where the transformer has a guidance embedding."""
    b, c, h, w = x.shape
    packed = pipe._pack_latents(x, b, c, h, w)
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    txt_ids = torch.zeros(pos.shape[1], 3)
    g = torch.full([1], guidance).expand(b) if pipe.transformer.config.guidance_embeds else None
    with torch.no_grad():
        out = pipe.transformer(hidden_states=packed, timestep=sigma * 1000 / 1000, guidance=g,
                               pooled_projections=pooled, encoder_hidden_states=pos,
                               txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]  # fmt: skip
    return pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                pipe.vae_scale_factor)  # fmt: skip


def pipeline_grid(pipe, num_steps, side=SIDE):
    """FluxPipeline.__call__'s time grid: its sigmas linspace(1, 1/N, N) and its mu for the
    packed sequence's length, through retrieve_timesteps."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    config = pipe.scheduler.config
    tokens = (side // pipe.vae_scale_factor // 2) ** 2
    mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len,
                         config.base_shift, config.max_shift)  # fmt: skip
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    return retrieve_timesteps(pipe.scheduler, num_steps, "cpu", sigmas=sigmas, mu=mu)[0]


def test_family_sizes_and_time_grid_are_the_flux_pipelines(parts):
    task = build_task(config(parts, num_steps=6, task_params={"resolution": 32}))
    assert task.family.name == "flux" and task.family.pipeline == "FluxPipeline"
    assert task.sample_shape == (16, 16, 16)  # unpacked: 64 input channels = 16 × 2 × 2
    assert isinstance(task.kernel, FlowKernel) and task.time_scale == 1
    pipe = pipeline(parts)
    assert FLUX_SAMPLE_SIZE == pipe.default_sample_size  # the native side without resolution
    timesteps = pipeline_grid(pipe, 6, side=32)
    torch.testing.assert_close(task.kernel.sigmas, pipe.scheduler.sigmas, rtol=0, atol=0)
    # the transformer's timestep is the pipeline's, timesteps / 1000
    times = task.kernel.model_time(torch.arange(6)) * task.time_scale
    torch.testing.assert_close(times, timesteps / 1000)
    # and the grid is the one the pipeline's own call steps through
    pipe("a cat", num_inference_steps=6, height=32, width=32, output_type="latent")
    torch.testing.assert_close(task.kernel.sigmas, pipe.scheduler.sigmas, rtol=0, atol=0)
    assert bool((task.kernel.stds > 0).all())


@pytest.mark.parametrize("model, length", [("flux", 512), ("schnell", 256)])
def test_prompt_embeddings_are_the_pipelines_encode_prompt(parts, model, length):
    # FLUX.1-dev at the pipeline's default 512 T5 tokens; schnell at 256, the most its
    # pipeline docs allow
    task = build_task(config(parts, model))
    cond = torch.tensor([3, 0])
    pipe = pipeline(parts, model)
    pos, pooled, ids = pipe.encode_prompt(
        task.prompts_of(cond), None, device="cpu", max_sequence_length=length
    )
    assert pos.shape == (2, length, 48) and pooled.shape == (2, 32)  # T5's, CLIP-L's pooled
    assert ids.shape == (length, 3) and not ids.any()
    ours, ours_pooled = task.text.rows(cond)
    # encoded 32 at a time, theirs 2: T5's float32 sums differ in the last bits with the batch
    torch.testing.assert_close(ours, pos, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_pooled, pooled)
    more = task.add_prompts([("an owl", None)])  # held-out prompts: the same encoding
    pos, pooled, _ = pipe.encode_prompt(["an owl"], None, device="cpu", max_sequence_length=length)
    torch.testing.assert_close(task.text.rows(more)[0], pos, rtol=1e-4, atol=1e-4)


def test_packing_is_the_pipelines_and_round_trips():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 8)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 8), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 6, 8), x, rtol=0, atol=0)
    theirs = FluxPipeline._unpack_latents(packed, 6 * 8, 8 * 8, 8)  # from pixels, 8× VAE
    torch.testing.assert_close(theirs, x, rtol=0, atol=0)
    want = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    torch.testing.assert_close(latent_ids(6, 8, "cpu", torch.float32), want, rtol=0, atol=0)


@pytest.mark.parametrize("model", ["flux", "schnell"])
def test_the_transformer_call_and_decode_are_the_pipelines(parts, model):
    task = build_task(config(parts, model))
    assert task.guidance_input == (model == "flux")
    pipe = pipeline(parts, model)
    x = torch.randn((2, *task.sample_shape), generator=torch.Generator().manual_seed(0))
    k, cond = torch.tensor([0, 2]), torch.tensor([1, 2])
    sigma = task.kernel.model_time(k)
    pos, pooled = task.text.rows(cond)
    with torch.no_grad():
        ours = task.model_output(x, sigma, cond, policy=False)
        want = pipeline_velocity(pipe, x, sigma, pos, pooled, guidance=task.options.guidance)
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)
        if model == "flux":  # the guidance scale is an input that matters
            other = pipeline_velocity(pipe, x, sigma, pos, pooled, guidance=7.0)
            assert not torch.allclose(other, want)
        torch.testing.assert_close(
            task.reference_x0(x, k, cond), x - sigma.view(-1, 1, 1, 1) * ours
        )
        # the pipeline's decode: unpacked latents / scaling_factor + shift_factor
        vae = task.vae.config
        assert (vae.scaling_factor, vae.shift_factor) == (0.3611, 0.1159)
        img = pipe.vae.decode(x / vae.scaling_factor + vae.shift_factor).sample
        torch.testing.assert_close(task.decode(x), (img / 2 + 0.5).clamp(0, 1))


def test_the_step_at_vanishing_noise_is_the_schedulers_step(parts):
    task = build_task(config(parts, task_params={"noise_level": 1e-6}))
    pipe = pipeline(parts)
    timesteps = pipeline_grid(pipe, 4)
    g, cond = torch.Generator().manual_seed(2), torch.tensor([1, 4])
    for k, t in enumerate(timesteps):
        x = torch.randn((2, *task.sample_shape), generator=g)
        ks = torch.full((2,), k)
        with torch.no_grad():
            out = task.model_output(x, task.model_time(ks, x), cond, policy=False)
        # the pipeline steps the packed latents with the packed velocity
        euler = pipe.scheduler.step(pack_latents(out), t, pack_latents(x)).prev_sample
        mean, std = task.kernel.step(out, x, ks)
        torch.testing.assert_close(pack_latents(mean), euler, rtol=1e-5, atol=1e-5)
        assert float(std.max()) < 1e-5


def test_two_updates_change_the_lora_and_a_plain_flux_pipeline_loads_it(parts, trained):
    final = load_file(str(trained / "final" / "policy.safetensors"))
    assert final and all(".default." in k for k in final)
    assert any(float(v.abs().max()) > 0 for k, v in final.items() if "lora_B" in k)
    # SD3's defaults match FLUX's attentions: q, k, v of every block, the output projection of
    # the double-stream blocks (the single-stream blocks' attention has none)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in final} == {"to_q", "to_k", "to_v", "0"}
    assert any(k.startswith("single_transformer_blocks.") for k in final)

    task = build_task(config(parts))
    task.policy.load_state_dict(final)
    pipe = pipeline(parts)
    x = torch.randn((2, *task.sample_shape), generator=torch.Generator().manual_seed(1))

    def image():
        g = torch.Generator().manual_seed(0)
        return pipe(["a cat"], num_inference_steps=2, height=SIDE, width=SIDE, output_type="pt",
                    guidance_scale=3.0, generator=g).images  # fmt: skip

    reloaded_lora_matches_the_run(pipe, task, trained / "final", pipeline_velocity, image, x, SIDE)


def test_sample_renders_a_flux_run_with_the_flux_pipeline(parts, trained, tmp_path, monkeypatch):
    from diffusers import FluxPipeline

    from sqdf.cli import main

    calls, real_call = [], FluxPipeline.__call__

    def recording(pipe, prompt, **kw):
        calls.append((kw["num_inference_steps"], kw["guidance_scale"], kw.get("height"),
                      "negative_prompt" in kw, kw["max_sequence_length"]))  # fmt: skip
        return real_call(pipe, prompt, **kw)

    monkeypatch.setattr(FluxPipeline, "__call__", recording)
    grid = tmp_path / "grid.png"
    argv = ["sample", "--task", "sd", "--model", str(parts / "flux"), "--lora",
            str(trained / "final"), "--num-samples", "2", "--device", "cpu",
            "--out", str(grid)]  # fmt: skip
    assert main(argv) == 0 and grid.stat().st_size > 200
    # the run's 4 steps, guidance 3 and 16 px, no negative prompt, dev's 512 T5 tokens;
    # reference and fine-tuned
    assert calls == [(4, 3.0, SIDE, False, 512)] * 4
    calls.clear()  # schnell at the 256 tokens it trains on
    schnell = ["sample", "--task", "sd", "--model", str(parts / "schnell"), "--num-samples",
               "1", "--device", "cpu", "--num-steps", "2", "--guidance", "1", "--out",
               str(grid)]  # fmt: skip
    assert main(schnell) == 0 and calls == [(2, 1.0, None, False, 256)]
    # a run with true CFG renders with the pipeline's: its scale and the run's negative
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    shutil.copy(trained / "final" / "pytorch_lora_weights.safetensors", run / "final")
    doc = json.loads((trained / "config.json").read_text())
    doc["train"]["task_params"] |= {"true_cfg": 2.5, "negative_prompt": "blurry"}
    (run / "config.json").write_text(json.dumps(doc))
    calls.clear()
    monkeypatch.setattr(FluxPipeline, "__call__", lambda pipe, prompt, **kw: (
        calls.append((kw.get("true_cfg_scale"), kw.get("negative_prompt")))
        or real_call(pipe, prompt, **kw)))  # fmt: skip
    argv[argv.index("--lora") + 1] = str(run / "final")
    assert main(argv) == 0
    assert calls == [(2.5, "blurry")] * 4


def _copy(parts, tmp_path, name="flux"):
    return copy_model(parts, tmp_path, name)


def test_model_picks_the_family_and_errors_are_one_line(parts, tmp_path, capsys):
    from sqdf.cli import main

    dry = ["--task-param", f"resolution={SIDE}", "--dry-run"]
    assert main(["train", "--task", "sd", "--model", str(parts / "flux"), *dry]) == 0
    out = capsys.readouterr().out
    assert "model: FLUX.1 (FluxPipeline)" in out
    assert "D = 1,024 dimensions (16 x 8 x 8)" in out
    sd3 = _copy(parts, tmp_path)
    edit_json(sd3 / "model_index.json", transformer=["diffusers", "SD3Transformer2DModel"])
    no_t5 = _copy(parts, tmp_path / "t5")
    shutil.rmtree(no_t5 / "text_encoder_2")
    heun = _copy(parts, tmp_path / "heun")
    edit_json(
        heun / "scheduler" / "scheduler_config.json", _class_name="FlowMatchHeunDiscreteScheduler"
    )
    no_index = _copy(parts, tmp_path / "no_index")
    (no_index / "model_index.json").unlink()
    cases = [
        (sd3, "flux/transformer is a SD3Transformer2DModel; a FluxPipeline folder's is a "
              "FluxTransformer2DModel"),
        (no_t5, "is not a complete FLUX.1 folder (missing text_encoder_2/)"),
        (heun, "scheduler is a FlowMatchHeunDiscreteScheduler; sqdf steps FLUX.1 through the "
               "time grid of a FlowMatchEulerDiscreteScheduler"),
        (no_index, "has a transformer/ but no model_index.json, which says which pipeline it is "
                   "(StableDiffusion3Pipeline for SD 3/3.5, FluxPipeline for FLUX.1)"),
    ]  # fmt: skip
    for folder, expected in cases:
        assert main(["train", "--task", "sd", "--model", str(folder), *dry]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    argv = ["train", "--task", "sd", "--model", str(parts / "schnell"), *dry]
    assert main(argv) == 2  # schnell at the default guidance 5
    err = capsys.readouterr().err.strip()
    assert "has no guidance embedding (schnell); set guidance=1 (true_cfg > 1 adds a" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "over,expected",
    [
        ({"eta": 0.5}, "eta is DDIM's; the flow SDE's noise (FLUX.1) is task_params.noise_level"),
        ({"estimator": "consistency"}, "estimator consistency needs task_params.lcm (a few-step "
         "distilled FluxTransformer2DModel folder"),
        ({"task_params": {"lcm": "."}}, "holds no diffusers model (no config.json); a consistency "
         "model for FLUX.1 is a FluxTransformer2DModel folder"),
        ({"task_params": {"finetune": "full"}}, "FLUX.1 trains a LoRA only"),
        ({"task_params": {"negative_prompt": "blurry"}}, "FLUX.1 runs a negative pass only "
         "with true CFG (its guidance is distilled into the transformer); set true_cfg > 1"),
        ({"task_params": {"true_cfg": 0.5}}, "sd true_cfg must be >= 1 (1 is none), got 0.5"),
    ],
)  # fmt: skip
def test_settings_that_do_not_apply_to_flux_are_refused(parts, over, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        build_task(config(parts, **over))


def test_a_resolution_off_the_packing_grid_is_refused(parts, tmp_path):
    model = _copy(parts, tmp_path)  # an 8× VAE, as FLUX's: 2×2 packed latents of 1/8 side
    edit_json(model / "vae" / "config.json", block_out_channels=[8, 16, 16, 16])
    with pytest.raises(ConfigError, match=re.escape("sd resolution 520 is not a multiple of 16 "
                                                    "(VAE 8 × patch 2)")):  # fmt: skip
        build_task(config(parts, task_params={"model": str(model), "resolution": 520}))


def test_eval_scores_a_flux_run_on_held_out_prompts(trained):
    """sqdf eval of a FLUX run against its held-out images drawn again: the rewards, the
    path KL, the diversity and the Fréchet distance recomputed from them."""
    from sqdf.cli import main
    from sqdf.evaluation.evaluate import EVAL_SEED

    assert main(["eval", str(trained), "--per-prompt", "2", "--no-progress"]) == 0
    metrics = json.loads((trained / "eval.json").read_text())
    held_out_numbers_are_the_images(metrics, held_out_drawn_again(trained, 2, EVAL_SEED))


def test_flux_guide_commands_run_on_tiny_parts(parts, tmp_path, monkeypatch):
    """The page's commands by Hub id, against a stand-in Hub serving the tiny parts."""
    lines = doc_lines("docs/guides/flux.md", "--model black-forest-labs/FLUX.1-dev ")
    assert len(lines) == 3
    for i in (0, 2):  # 512 px through the tiny 2× VAE: too big
        assert "resolution=512" in lines[i] and "guidance=3.5" in lines[i]
        lines[i] = lines[i].replace("=512", f"={SIDE}")
    repos = {"black-forest-labs/FLUX.1-dev": parts / "flux",
             "black-forest-labs/FLUX.1-schnell/transformer": parts / "schnell" / "transformer",
             **reward_defaults(parts)}  # fmt: skip
    monkeypatch.chdir(tmp_path)
    run_doc_lines(lines, repos, tmp_path, monkeypatch)
    config = json.loads((tmp_path / "runs/flux/config.json").read_text())
    assert config["train"]["task_params"]["guidance"] == 3.5
    assert (tmp_path / "runs/flux/final/pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "runs/flux/grid.png").is_file()
    config = json.loads((tmp_path / "runs/flux-schnell-q/config.json").read_text())
    assert config["train"]["estimator"] == "consistency"
    assert (tmp_path / "runs/flux-schnell-q/final/pytorch_lora_weights.safetensors").is_file()


def test_every_method_and_best_of_n_run_through_compare(parts, tmp_path):
    # a batch of 4: grpo's default groups of 4 samples per prompt fill it
    base = sd_settings(
        parts / "flux", parts, steps=1, batch_size=4, task_params={"resolution": SIDE}
    )
    every_method_runs_through_compare(base, tmp_path)


@pytest.mark.parametrize("estimator", ["tweedie", "consistency"])
def test_checkpointing_gives_the_same_gradient_with_the_adapter_switched_in_the_loss(
    parts, estimator
):
    lcm = {"lcm": str(parts / "schnell")} if estimator == "consistency" else {}
    checkpointing_keeps_the_gradient(
        lambda on: config(
            parts, estimator=estimator, task_params={"gradient_checkpointing": on, **lcm}
        )
    )


def test_a_schnell_style_transformer_is_the_consistency_estimator(parts, tmp_path, monkeypatch):
    # schnell has no guidance embedding: it is called without one, as its pipeline calls it
    import sqdf.tasks.sd_text as sd_text

    schnell = pipeline(parts, "schnell")
    loads, load = [], sd_text.load_part
    monkeypatch.setattr(sd_text, "load_part", lambda cls, f, sub, **k: loads.append(sub)
                        or load(cls, f, sub, **k))  # fmt: skip
    task = build_task(config(parts, estimator="consistency",
                             task_params={"lcm": str(parts / "schnell")}))  # fmt: skip
    encoders = [sub for sub in loads if sub.startswith("text_encoder")]
    assert encoders == ["text_encoder", "text_encoder_2"]  # once, for both T5 lengths
    distilled_x0_is_one_call(task, lambda *a: pipeline_velocity(schnell, *a))
    # and with the prompts as schnell's pipeline encodes them: 256 T5 tokens, not dev's 512
    cond = torch.tensor([1, 3])
    pos, pooled, _ = schnell.encode_prompt(task.prompts_of(cond), None, device="cpu",
                                           max_sequence_length=256)  # fmt: skip
    ours, ours_pooled = task.distilled_text.rows(cond)
    torch.testing.assert_close(ours, pos, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_pooled, pooled)
    assert task.text.rows(cond)[0].shape[1] == 512  # the model's own are dev's
    more = task.add_prompts([("an owl", None)])  # held-out prompts: both encodings grow
    pos, _, _ = schnell.encode_prompt(["an owl"], None, device="cpu", max_sequence_length=256)
    torch.testing.assert_close(task.distilled_text.rows(more)[0], pos, rtol=1e-4, atol=1e-4)
    assert task.text.rows(more)[0].shape[1] == 512
    # a guidance-distilled one is given the run's guidance: the base itself gives Tweedie's x̂0
    task = build_task(config(parts, estimator="consistency",
                             task_params={"lcm": str(parts / "flux" / "transformer")}))  # fmt: skip
    dev = pipeline(parts)
    distilled_x0_is_one_call(
        task, lambda *a: pipeline_velocity(dev, *a, guidance=task.options.guidance),
        reference=True,
    )  # fmt: skip
    run = train(config(parts, estimator="consistency", task_params={"lcm": str(parts / "schnell")}),
                tmp_path / "run", progress=False)  # fmt: skip
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_a_prompts_file_with_negatives_is_refused(parts, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\tblurry\n")
    with pytest.raises(ConfigError, match="a line sets a negative prompt, and FLUX.1 runs a "
                                          "negative pass only with true CFG"):  # fmt: skip
        build_task(config(parts, task_params={"prompts": str(prompts)}))
    # with true CFG the line's negative is its pass's
    task = build_task(config(parts, task_params={"prompts": str(prompts), "true_cfg": 2.0}))
    assert task.negatives == ["", "blurry"]


@pytest.mark.parametrize("negative", ["blurry", ""])
def test_true_cfg_is_the_pipelines_negative_pass(parts, negative):
    task = build_task(config(parts, task_params={"true_cfg": 4.0, "negative_prompt": negative}))
    pipe = pipeline(parts)
    x = torch.randn((2, *task.sample_shape), generator=torch.Generator().manual_seed(4))
    k, cond = torch.tensor([1, 3]), torch.tensor([0, 2])
    sigma = task.kernel.model_time(k)
    pos, pooled = pipe.encode_prompt(task.prompts_of(cond), None, device="cpu")[:2]
    # the pipeline encodes "" as the empty prompt's pass (any string negative runs true CFG)
    neg, neg_pooled = pipe.encode_prompt([negative] * 2, None, device="cpu")[:2]
    g = task.options.guidance  # FLUX.1-dev's guidance input, in both passes
    c = pipeline_velocity(pipe, x, sigma, pos, pooled, guidance=g)
    u = pipeline_velocity(pipe, x, sigma, neg, neg_pooled, guidance=g)
    with torch.no_grad():
        ours = task.model_output(x, sigma, cond, policy=False)
    torch.testing.assert_close(ours, u + 4.0 * (c - u), rtol=1e-4, atol=1e-4)


def test_true_cfg_on_a_unet_family_is_refused(tmp_path):
    from sqdf.tasks.sd import SDConfig

    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / name).mkdir()
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ConfigError, match="sd true_cfg is FLUX.1's negative pass; SD 1.x/2.x runs"):
        SDConfig(model=str(tmp_path), true_cfg=2.0)
