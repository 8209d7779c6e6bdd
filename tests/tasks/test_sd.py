"""The sd task on tiny random-initialised components of the real classes (issue 6): each
piece checked against diffusers/transformers doing the same thing their own way."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from safetensors.torch import load_file

from sqdf.core.x0 import consistency_x0, guidance_embedding
from sqdf.errors import ConfigError, SqdfError
from sqdf.rewards import build_reward
from sqdf.rewards.clip_rewards import (
    CLIP_MEAN,
    CLIP_STD,
    clip_preprocess,
    convert_aesthetic_head,
)
from sqdf.tasks import build_task
from sqdf.tasks.sd import save_diffusers_lora
from sqdf.tasks.sd_prompts import ANIMALS, load_prompt_pairs, load_prompts
from sqdf.tasks.sd_random import (
    write_random_lcm_lora,
    write_random_lcm_unet,
)
from sqdf.training.trainer import train
from tests.tasks.sd_runs import (
    checkpointing_keeps_the_gradient,
    reward_defaults,
    run_doc_lines,
    sd_config,
    sd_pipeline,
    write_tiny_parts,
)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = write_tiny_parts(tmp_path_factory.mktemp("sd"))
    write_random_lcm_unet(root / "lcm")
    write_random_lcm_lora(root / "sd", root / "lcm_lora")  # for the base UNet
    return root


def config(parts, **over):
    return sd_config(parts / "sd", parts, **over)


def pipeline(parts):
    return sd_pipeline(parts / "sd")


def test_prompt_embeddings_and_guidance_match_the_diffusers_pipeline(parts):
    task = build_task(config(parts, task_params={"negative_prompt": "blurry"}))
    pipe = pipeline(parts)
    cond = torch.tensor([3, 0])
    prompts = task.prompts_of(cond)
    pos, neg = pipe.encode_prompt(prompts, "cpu", 1, True, ["blurry"] * 2)
    torch.testing.assert_close(task.text.embeds[cond], pos)
    torch.testing.assert_close(task.text.rows(cond, negative=True)[0], neg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *task.sample_shape), generator=g)
    t = torch.tensor([901, 301])
    with torch.no_grad():
        ours = task.model_output(x, t, cond, policy=False)
        u = pipe.unet(x, t, encoder_hidden_states=neg).sample
        c = pipe.unet(x, t, encoder_hidden_states=pos).sample
    torch.testing.assert_close(ours, u + 3.0 * (c - u), rtol=1e-4, atol=1e-5)
    assert task.sample_shape == (4, 8, 8)  # 16 px images through a 2x VAE


def test_prompts_are_encoded_before_the_denoiser_is_loaded(parts, monkeypatch):
    """The text encoders are let go before the denoiser and VAE arrive (sqdf.cost counts
    the prompt encoding's peak as the encoders' weights alone)."""
    import sqdf.tasks.sd as sd

    events = []
    encode, load = sd.encode_prompts, sd.load_part
    monkeypatch.setattr(
        sd, "encode_prompts", lambda *a, **k: events.append("encode") or encode(*a, **k)
    )
    monkeypatch.setattr(
        sd, "load_part", lambda cls, f, sub, **k: events.append(sub) or load(cls, f, sub, **k)
    )
    build_task(config(parts))
    assert events.index("encode") < events.index("unet") < events.index("vae")


def test_vae_slicing_decodes_the_same_images(parts):
    task = build_task(config(parts, task_params={"vae_slicing": True}))
    assert task.vae.use_slicing
    latents = torch.randn((3, *task.sample_shape), generator=torch.Generator().manual_seed(0))
    sliced = task.decode(latents)
    task.vae.disable_slicing()
    torch.testing.assert_close(sliced, task.decode(latents))


def test_two_updates_change_the_lora_and_a_plain_pipeline_loads_it(parts, tmp_path):
    run = train(config(parts, estimator="consistency", task_params={"lcm": str(parts / "lcm")}),
                tmp_path / "run", progress=False)  # fmt: skip
    final = load_file(str(run / "final" / "policy.safetensors"))
    assert final and all(".default." in k for k in final)
    assert any(float(v.abs().max()) > 0 for k, v in final.items() if "lora_B" in k)

    task = build_task(config(parts))
    task.policy.load_state_dict(final)
    pipe = pipeline(parts)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, *task.sample_shape), generator=g)
    t, cond = torch.tensor([500, 40]), torch.tensor([1, 2])
    emb = task.text.embeds[cond]
    with torch.no_grad():
        before = pipe.unet(x, t, encoder_hidden_states=emb).sample
        pipe.load_lora_weights(str(run / "final"))
        after = pipe.unet(x, t, encoder_hidden_states=emb).sample
        ours = task.unet(x, t, encoder_hidden_states=emb).sample
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ours, rtol=1e-4, atol=1e-5)
    image = pipe(["a cat"], num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def test_lora_alpha_other_than_rank_survives_the_diffusers_format(parts, tmp_path):
    task = build_task(config(parts, task_params={"lora_rank": 2, "lora_alpha": 6.0}))
    with torch.no_grad():
        for name, p in task.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_diffusers_lora(task.unet, 2, 6.0, tmp_path)
    pipe = pipeline(parts)
    pipe.load_lora_weights(str(tmp_path))
    x, t = torch.randn((1, *task.sample_shape)), torch.tensor([700])
    emb = task.text.embeds[:1]
    with torch.no_grad():
        torch.testing.assert_close(
            pipe.unet(x, t, encoder_hidden_states=emb).sample,
            task.unet(x, t, encoder_hidden_states=emb).sample, rtol=1e-4, atol=1e-5,
        )  # fmt: skip


def test_lcm_unet_estimator_uses_the_guidance_embedding(parts):
    from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel

    lcm = {"lcm": str(parts / "lcm"), "lcm_guidance": 6.0}
    task = build_task(config(parts, estimator="consistency", task_params=lcm))
    w = torch.tensor([5.0, 0.5])
    reference = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, 16)
    torch.testing.assert_close(guidance_embedding(w, 16), reference)
    lcm = UNet2DConditionModel.from_pretrained(str(parts / "lcm"))
    x, t, cond = (
        torch.randn((2, *task.sample_shape)),
        torch.tensor([759, 259]),
        torch.tensor([0, 5]),
    )
    abar = task.schedule.abar(t).view(-1, 1, 1, 1)
    with torch.no_grad():
        out = lcm(x, t, encoder_hidden_states=task.text.embeds[cond],
                  timestep_cond=guidance_embedding(torch.full((2,), 5.0), 16)).sample  # fmt: skip
        want = consistency_x0(out, x, abar, t.view(-1, 1, 1, 1))
        torch.testing.assert_close(task.consistency_x0(x, t, cond), want)


def test_lcm_lora_sits_beside_the_policy_adapter(parts):
    task = build_task(config(parts, estimator="consistency",
                             task_params={"lcm": str(parts / "lcm_lora")
                                          + "/pytorch_lora_weights.safetensors"}))  # fmt: skip
    trainable = [n for n, p in task.unet.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    assert all(".lcm." not in k for k in task.policy.state_dict())
    pipe = pipeline(parts)
    pipe.load_lora_weights(str(parts / "lcm_lora"))
    x, t, cond = (
        torch.randn((2, *task.sample_shape)),
        torch.tensor([600, 100]),
        torch.tensor([2, 7]),
    )
    abar = task.schedule.abar(t).view(-1, 1, 1, 1)
    with torch.no_grad():
        out = pipe.unet(x, t, encoder_hidden_states=task.text.embeds[cond]).sample
        want = consistency_x0(out, x, abar, t.view(-1, 1, 1, 1))
        got = task.consistency_x0(x, t, cond)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for name, p in task.unet.named_parameters():  # move the policy: the CM must not follow
            if ".default." in name and "lora_B" in name:
                p.normal_(0, 0.5)
        torch.testing.assert_close(task.consistency_x0(x, t, cond), got)
        moved = task.model_output(x, t, cond, policy=True)
        assert not torch.allclose(moved, task.model_output(x, t, cond, policy=False))


def directional_check(reward, images, prompts):
    images = images.clone().requires_grad_(True)
    value = reward(images, prompts)
    assert value.shape == (images.shape[0],) and torch.isfinite(value).all()
    (grad,) = torch.autograd.grad(value.sum(), images)
    direction = torch.randn_like(images)
    eps = 1e-3
    with torch.no_grad():
        plus = reward(images + eps * direction, prompts).sum()
        minus = reward(images - eps * direction, prompts).sum()
    fd = (plus - minus) / (2 * eps)
    torch.testing.assert_close((grad * direction).sum(), fd, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "clipscore"])
def test_clip_rewards_load_from_a_folder_and_their_gradient_is_right(parts, name):
    params = {"aesthetic": {"clip": str(parts / "clip"), "head": str(parts / "head.safetensors")},
              "pickscore": {"model": str(parts / "clip"), "processor": str(parts / "clip")},
              "clipscore": {"model": str(parts / "clip")}}[name]  # fmt: skip
    reward = build_reward(name, params)
    g = torch.Generator().manual_seed(0)
    images = torch.rand((2, 3, 40, 48), generator=g) * 0.8 + 0.1
    directional_check(reward, images, ["a red fox", "a lighthouse"])


def test_aesthetic_reward_is_the_head_on_normalised_clip_features(parts):
    from transformers import CLIPModel

    reward = build_reward("aesthetic", {"clip": str(parts / "clip"),
                                        "head": str(parts / "head.safetensors")})  # fmt: skip
    images = torch.rand((3, 3, 32, 32))
    clip = CLIPModel.from_pretrained(str(parts / "clip"))
    pixels = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        feats = clip.get_image_features(pixel_values=pixels)
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        feats = feats / feats.norm(dim=-1, keepdim=True)
        head = torch.load(str(parts / "head.pth"), weights_only=True)
        x = feats
        for i in (0, 2, 4, 6, 7):  # dropout layers sit between; evaluation skips them
            x = x @ head[f"layers.{i}.weight"].T + head[f"layers.{i}.bias"]
        torch.testing.assert_close(reward(images), x.squeeze(1), rtol=1e-4, atol=1e-5)


def test_pickscore_and_clipscore_are_clips_own_scoring(parts):
    """PickScore as its authors compute it (logit scale x cosine of the L2-normalised image
    and prompt embeddings) and CLIPScore as torchmetrics does (max(100 x cosine, 0)), from
    transformers' CLIPModel forward, its image processor and its tokenizer padding to the
    longest prompt (ours pads to 77 tokens: the pooled EOS token must not care)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = str(parts / "clip")
    clip = CLIPModel.from_pretrained(folder).eval()
    images = torch.rand((4, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    prompts = ["a red fox", "a lighthouse at dusk on a rocky shore", "a red fox", "an owl"]
    pixels = CLIPImageProcessor.from_pretrained(folder)(
        images=list(images), do_resize=False, do_center_crop=False, do_rescale=False,
        return_tensors="pt",
    ).pixel_values  # fmt: skip
    text = CLIPTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clip(pixel_values=pixels, input_ids=text.input_ids,
                   attention_mask=text.attention_mask)  # fmt: skip
    pick = out.logits_per_image.diagonal()  # image i against its own prompt i
    cosine = (out.image_embeds * out.text_embeds).sum(-1)  # both L2-normalised by CLIPModel
    assert clip.logit_scale.exp() > 1 and (cosine > 0).any() and (cosine < 0).any()
    # the tiny CLIP folder holds its own tokenizer and processor (PickScore's default processor
    # is a Hub repository)
    ours = {
        "pickscore": build_reward("pickscore", {"model": folder, "processor": folder}),
        "clipscore": build_reward("clipscore", {"model": folder}),
    }
    torch.testing.assert_close(ours["pickscore"](images, prompts), pick, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        ours["clipscore"](images, prompts), (100 * cosine).clamp(min=0), rtol=1e-4, atol=1e-4
    )


def test_clip_preprocess_normalises_and_crops():
    const = torch.full((1, 3, 50, 80), 0.25)
    out = clip_preprocess(const, 32, CLIP_MEAN, CLIP_STD)
    assert out.shape == (1, 3, 32, 32)
    want = (0.25 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[0, :, 5, 7], want, rtol=1e-5, atol=1e-5)


def test_custom_reward_gets_images_in_unit_range_and_prompt_strings(parts, tmp_path, monkeypatch):
    (tmp_path / "sd_user_reward.py").write_text(
        "import torch\n"
        "SEEN = []\n"
        "def redness(images, prompts):\n"
        "    SEEN.append((images.detach().clone(), list(prompts)))\n"
        "    return images[:, 0].flatten(1).mean(1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = build_task(config(parts, reward="sd_user_reward:redness", reward_params={}))
    x0 = torch.randn((2, *task.sample_shape))
    value = task.reward(x0, torch.tensor([4, 1]))
    import sd_user_reward

    images, prompts = sd_user_reward.SEEN[-1]
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert prompts == task.prompts_of(torch.tensor([4, 1]))
    torch.testing.assert_close(value, images[:, 0].flatten(1).mean(1))
    sys.modules.pop("sd_user_reward", None)


def test_prompt_sets_and_files(tmp_path):
    assert load_prompts("animals") == list(ANIMALS) and len(ANIMALS) == 45
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \n")
    assert load_prompts(str(f)) == ["a cat", "a dog"]
    f.write_text("a cat\tblurry, dark\na dog\n")
    assert load_prompt_pairs(str(f)) == [("a cat", "blurry, dark"), ("a dog", None)]
    f.write_text("\n \n")
    with pytest.raises(ConfigError, match="has no prompts"):
        load_prompts(str(f))
    with pytest.raises(ConfigError, match="neither a built-in set"):
        load_prompts(str(tmp_path / "missing.txt"))
    f.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="cannot read prompts file"):
        load_prompts(str(f))


def test_bad_sd_settings_are_one_clear_error(parts, tmp_path):
    with pytest.raises(ConfigError, match="needs a Stable Diffusion model"):
        build_task(config(parts, task_params={"model": None}))
    with pytest.raises(ConfigError, match="is not a complete SD 1.x/2.x folder"):
        build_task(config(parts, task_params={"model": str(tmp_path)}))
    with pytest.raises(ConfigError, match="estimator consistency needs task_params.lcm"):
        build_task(config(parts, estimator="consistency"))
    with pytest.raises(ConfigError, match="reward 'aesthetic' needs clip=FOLDER"):
        build_task(config(parts, reward_params={"clip": None}))
    with pytest.raises(ConfigError, match="needs an image reward"):
        build_task(config(parts, reward="linear", reward_params={}))
    (tmp_path / "junk.pth").write_bytes(b"")
    torch.save({"w": torch.zeros(1)}, str(tmp_path / "junk.pth"))
    with pytest.raises(SqdfError, match="not an aesthetic-head state dict"):
        convert_aesthetic_head(tmp_path / "junk.pth", tmp_path / "h.safetensors")


def test_cli_train_eval_and_render_with_the_lora(parts, tmp_path, capsys, monkeypatch):
    import json

    from diffusers import StableDiffusionPipeline

    from sqdf.cli import main

    head = tmp_path / "head.safetensors"
    assert main(["convert-aesthetic-head", str(parts / "head.pth"), str(head)]) == 0
    run = tmp_path / "run"
    argv = ["train", "--task", "sd", "--model", str(parts / "sd"), "--prompts", "varied",
            "--reward", "aesthetic", "--reward-param", f"clip={parts / 'clip'}",
            "--reward-param", f"head={head}", "--estimator", "tweedie", "--num-steps", "3",
            "--steps", "2", "--batch-size", "2", "--buffer-size", "8", "--grad-accum", "1",
            "--device", "cpu", "--out", str(run), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert main(["eval", str(run), "--per-prompt", "2", "--no-progress"]) == 0
    metrics = __import__("json").loads((run / "eval.json").read_text())
    assert {"eval_diversity", "ref_eval_diversity", "reward_mean"} <= set(metrics)
    assert main(["sample", str(run), "--num-samples", "2"]) == 0  # the run's own sampler
    assert (run / "samples.png").stat().st_size > 1000
    # rendered as the run trained (its 3 DDIM steps, CFG 5, its prompts) unless told otherwise
    calls, real_call = [], StableDiffusionPipeline.__call__

    def recording(pipe, prompt, **kw):
        calls.append((prompt, kw["num_inference_steps"], kw["guidance_scale"]))
        return real_call(pipe, prompt, **kw)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", recording)
    # a run folder moved to another machine: what it pointed at is gone, rendering still works
    doc = json.loads((run / "config.json").read_text())
    doc["train"]["task_params"] |= {"model": "/gone/sd15", "lcm": "/gone/lcm.safetensors"}
    (run / "config.json").write_text(json.dumps(doc))
    grid = tmp_path / "grid.png"
    argv = ["sample", "--task", "sd", "--model", str(parts / "sd"), "--lora", str(run / "final"),
            "--num-samples", "2", "--device", "cpu", "--out", str(grid)]  # fmt: skip
    assert main(argv) == 0 and grid.stat().st_size > 1000
    varied = load_prompt_pairs("varied")
    assert calls == [(varied[0][0], 3, 5.0), (varied[1][0], 3, 5.0)] * 2  # reference, tuned
    calls.clear()
    assert main([*argv, "--num-steps", "2", "--guidance", "2.5", "--prompts", "animals"]) == 0
    assert calls[0] == (load_prompt_pairs("animals")[0][0], 2, 2.5)
    capsys.readouterr()
    assert main(["sample", "--task", "sd", "--model", str(parts / "sd"), "--lora", str(tmp_path),
                 "--device", "cpu"]) == 2  # fmt: skip
    assert "holds neither pytorch_lora_weights.safetensors nor unet/" in capsys.readouterr().err


@pytest.mark.parametrize("estimator", ["tweedie", "consistency"])
def test_checkpointing_gives_the_same_gradient_with_adapters_switched_in_the_loss(parts, estimator):
    lcm = {"lcm": str(parts / "lcm_lora") + "/pytorch_lora_weights.safetensors"}
    checkpointing_keeps_the_gradient(
        lambda on: config(
            parts, estimator=estimator, task_params={**lcm, "gradient_checkpointing": on}
        ),
        steps=(0, 1),
    )


def test_isotropic_gaussian_posterior_trains_the_lora(parts, tmp_path):
    """The Gaussian posterior with its isotropic covariance at SD's latent size: its probe's
    backward pass runs through a checkpointed UNet to the same gradient, and a run moves
    the LoRA."""
    posterior = {"estimator": "gaussian_posterior", "q_cov": "isotropic", "q_draws": 2}
    checkpointing_keeps_the_gradient(
        lambda on: config(parts, **posterior, task_params={"gradient_checkpointing": on}),
        steps=(0, 1),
    )
    run = train(config(parts, **posterior), tmp_path / "run", progress=False)
    final = load_file(str(run / "final" / "policy.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in final.items() if "lora_B" in k)


def test_a_prompt_file_line_can_carry_its_own_negative_prompt(parts, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red fox\tblurry\na lighthouse\n")
    task = build_task(config(parts, task_params={"prompts": str(f), "negative_prompt": "dark"}))
    pipe = pipeline(parts)
    for i, (prompt, negative) in enumerate([("a red fox", "blurry"), ("a lighthouse", "dark")]):
        pos, neg = pipe.encode_prompt([prompt], "cpu", 1, True, [negative])
        torch.testing.assert_close(task.text.embeds[i : i + 1], pos)
        torch.testing.assert_close(task.text.rows(torch.tensor([i]), negative=True)[0], neg)


SD_ORACLE = """
import torch
PROMPTS = []

def brightness(images, prompts):
    PROMPTS.extend(prompts)
    return images.mean(dim=(1, 2, 3)).tolist()
"""


def test_bbo_on_sd_sends_prompts_and_fits_the_proxy_on_clip_embeddings(parts, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    import importlib

    from sqdf.bbo import BboConfig, run_method
    from sqdf.bbo.data import load_rounds
    from sqdf.infra.checkpoint import load_weights

    (tmp_path / "sd_oracle.py").write_text(SD_ORACLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("sd_oracle")
    bbo = BboConfig(oracle="sd_oracle:brightness", rounds=2, queries_per_round=3,
                    updates_per_round=1, proxy_steps=10)  # fmt: skip
    rows = run_method(bbo, config(parts), "sqdf", 0, tmp_path / "run", progress=False)
    task = build_task(config(parts))
    rounds = load_rounds(tmp_path / "run")
    # the oracle saw [0, 1] images and their prompts as strings, nothing else
    assert module.PROMPTS == [p for r in rounds for p in task.prompts_of(r.cond)]
    side = task.sample_shape[-1] * 2 ** (len(task.vae.config.block_out_channels) - 1)
    for r in rounds:
        assert r.samples.shape == (3, 3, side, side)
        assert 0 <= float(r.samples.min()) and float(r.samples.max()) <= 1
        torch.testing.assert_close(r.value, r.samples.double().mean(dim=(1, 2, 3)))
    # the proxy reads the aesthetic reward's CLIP image embeddings (projection_dim wide)
    proxy = load_weights(tmp_path / "run" / "proxy" / "round_0000.safetensors")
    dim = task.reward_model.clip_model.model.config.projection_dim
    assert proxy["w1"].shape == (bbo.ensemble_size, dim, bbo.proxy_hidden)
    assert [r["queries"] for r in rows] == [3, 6] and math.isfinite(rows[1]["proxy_rmse"])
    assert math.isfinite(rows[1]["eval_diversity"])


def test_sd_task_oracle_scores_with_the_prompts(parts, tmp_path):
    from sqdf.bbo import BboConfig, run_method
    from sqdf.bbo.data import load_rounds

    params = {"model": str(parts / "clip"), "processor": str(parts / "clip")}
    cfg = config(parts, reward="pickscore", reward_params=params)
    run_method(BboConfig(rounds=1, queries_per_round=2), cfg, "best_of_n", 0, tmp_path / "r",
               progress=False)  # fmt: skip
    (data,) = load_rounds(tmp_path / "r")
    prompts = build_task(cfg).prompts_of(data.cond)
    with torch.no_grad():
        expected = build_reward("pickscore", params)(data.samples, prompts).double()
    torch.testing.assert_close(data.value, expected, rtol=1e-5, atol=1e-6)


def test_sd_proxy_needs_the_rewards_clip_features():
    from types import SimpleNamespace

    from sqdf.bbo.proxy import feature_map

    task = SimpleNamespace(reward_model=SimpleNamespace(name="custom"), device="cpu")
    with pytest.raises(SqdfError, match="CLIP image embeddings; reward 'custom' has none"):
        feature_map(task, "sd")


def test_full_fine_tuning_keeps_the_lcm_lora_on_the_frozen_reference(parts, tmp_path):
    from diffusers import UNet2DConditionModel

    from sqdf.cli import main

    lcm = {"lcm": str(parts / "lcm_lora") + "/pytorch_lora_weights.safetensors"}
    lora = build_task(config(parts, estimator="consistency", task_params=lcm))
    cfg = config(parts, estimator="consistency", task_params={**lcm, "finetune": "full"})
    full = build_task(cfg)
    assert full.policy is full.unet and full.shardable
    assert all(p.requires_grad and p.dtype == torch.float32 for p in full.unet.parameters())
    assert not any(p.requires_grad for p in full.nets.reference_net.parameters())
    x, t, cond = (
        torch.randn((2, *full.sample_shape)),
        torch.tensor([600, 100]),
        torch.tensor([2, 7]),
    )
    with torch.no_grad():  # the same LCM-LoRA on the same pretrained weights either way
        torch.testing.assert_close(full.consistency_x0(x, t, cond), lora.consistency_x0(x, t, cond))
        # policy and reference start from the plain pretrained UNet: no LCM-LoRA in either
        plain = lora.model_output(x, t, cond, policy=False)
        torch.testing.assert_close(full.model_output(x, t, cond, policy=True), plain)
        torch.testing.assert_close(full.model_output(x, t, cond, policy=False), plain)
    run = train(cfg, tmp_path / "run", progress=False)
    # final/unet is a diffusers UNet folder holding the fine-tuned weights
    unet = UNet2DConditionModel.from_pretrained(str(run / "final" / "unet"), use_safetensors=True)
    saved = load_file(str(run / "final" / "policy.safetensors"))
    assert set(unet.state_dict()) == set(saved)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in saved.items())
    base = lora.nets.reference_net.state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in saved.items() if k in base)
    grid = tmp_path / "grid.png"
    argv = ["sample", "--task", "sd", "--model", str(parts / "sd"), "--lora", str(run / "final"),
            "--num-samples", "1", "--num-steps", "2", "--device", "cpu",
            "--out", str(grid)]  # fmt: skip
    assert main(argv) == 0 and grid.stat().st_size > 1000


def test_float16_scales_the_loss_backs_off_on_overflow_and_resumes(parts, tmp_path, monkeypatch):
    import json

    import sqdf.training.start

    # a scale that overflows these float16 gradients (they fit from about 2^17): updates are
    # skipped and the scale halves until the gradients fit, then they go through
    monkeypatch.setattr(sqdf.training.start, "INITIAL_LOSS_SCALE", 2.0**20)
    cfg = config(parts, steps=8, checkpoint_every=4, log_every=1, lr=1e-3,
                 task_params={"dtype": "float16"})  # fmt: skip
    run = train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    stepped = [r for r in rows if math.isfinite(r["grad_norm"])]
    assert rows[0]["skipped_updates"] == 1 and len(stepped) >= 3
    state = json.loads((run / "checkpoints" / "step_0000008" / "state.json").read_text())
    assert state["loss_scaler"]["scale"] < 2.0**20
    weights = load_file(str(run / "final" / "policy.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k)
    # the scale is part of the checkpoint: a resumed run skips and steps as the whole one did
    part = tmp_path / "part"
    train(config(parts, steps=4, checkpoint_every=4, log_every=1, lr=1e-3,
                 task_params={"dtype": "float16"}), part, progress=False)  # fmt: skip
    train(cfg, part, resume=True, progress=False)
    resumed = load_file(str(part / "final" / "policy.safetensors"))
    assert all(torch.equal(resumed[k], v) for k, v in weights.items())


def test_float16_bbo_resumes_with_its_loss_scale(parts, tmp_path, monkeypatch):
    import importlib
    import json

    from sqdf.bbo import BboConfig, run_method
    from sqdf.training.start import INITIAL_LOSS_SCALE
    from tests.bbo.kill import killed_in_round_one_fine_tuning

    # the proxy's gradients overflow float16 at the initial scale here: round 0 halves it
    # a few times; a run resumed after round 0 that restarted the scale would skip updates
    # the whole run makes
    (tmp_path / "sd_oracle_fp16.py").write_text(SD_ORACLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("sd_oracle_fp16")
    bbo = BboConfig(oracle="sd_oracle_fp16:brightness", rounds=3, queries_per_round=4,
                    updates_per_round=5, proxy_steps=5)  # fmt: skip
    cfg = config(parts, lr=1e-3, task_params={"dtype": "float16"})
    run_method(bbo, cfg, "sqdf", 0, tmp_path / "whole", progress=False)
    with killed_in_round_one_fine_tuning(monkeypatch):
        run_method(bbo, cfg, "sqdf", 0, tmp_path / "cut", progress=False)
    run_method(bbo, cfg, "sqdf", 0, tmp_path / "cut", resume=True, progress=False)
    (ck,) = list((tmp_path / "cut" / "checkpoints").glob("step_0000001"))
    saved = json.loads((ck / "state.json").read_text())["loss_scaler"]["scale"]
    assert saved < INITIAL_LOSS_SCALE
    last = "train/round_0001/final/policy.safetensors"  # the last round's fine-tuning
    a, b = (load_file(str(tmp_path / run / last)) for run in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bbo_guide_sd_config_runs_on_tiny_parts(parts, tmp_path, monkeypatch):
    """The page's config and command as written, against a stand-in Hub serving the tiny
    parts under the Hub ids it names."""
    import json
    from pathlib import Path

    from tests.doc_commands import doc_block

    toml = doc_block("docs/guides/bbo.md", "# sd-bbo.toml", "toml")
    command = doc_block("docs/guides/bbo.md", "sqdf bbo --config sd-bbo.toml")
    monkeypatch.chdir(tmp_path)
    Path("sd-bbo.toml").write_text(toml)  # as written: its model and reward by Hub id
    small = ["--rounds", "2", "--queries-per-round", "2", "--updates-per-round", "1",
             "--seeds", "1", "--set", "num_steps=3", "--set", "batch_size=2",
             "--set", "grad_accum=1", "--set", "device='cpu'", "--methods", "sqdf,best_of_n",
             "--no-progress"]  # fmt: skip
    sd15 = "stable-diffusion-v1-5/stable-diffusion-v1-5@451f4fe16113bff5a5d2269ed5ad43b0592e9a14"
    repos = {sd15: parts / "sd", **reward_defaults(parts)}
    run_doc_lines(command.strip().splitlines(), repos, tmp_path, monkeypatch,
                  extra={"bbo": small})  # fmt: skip
    doc = json.loads((tmp_path / "runs/sd-bbo/results.json").read_text())
    assert doc["task"] == "sd" and list(doc["methods"]) == ["sqdf", "best_of_n"]


def test_sd_pictures_and_metrics_reach_tensorboard(parts, tmp_path):
    from tests.test_trackers import image_steps, tensorboard_scalars

    run = train(config(parts, sample_every=2, log_every=1, log_with="tensorboard"),
                tmp_path / "run", progress=False)  # fmt: skip
    assert [p.name for p in (run / "samples").iterdir()] == ["step_0000002.png"]
    assert image_steps(run) == [2]
    assert [s for s, _ in tensorboard_scalars(run)["reward_mean"]] == [1, 2]


def test_sd_ema_is_a_diffusers_lora_too_and_renders_as_the_run_trained(parts, tmp_path):
    from sqdf.cli import main
    from sqdf.evaluation.render import trained_settings

    run = train(config(parts, ema_decay=0.5, task_params={"guidance": 2.5}), tmp_path / "run",
                progress=False)  # fmt: skip
    lora = "pytorch_lora_weights.safetensors"
    ema, raw = (load_file(str(d / lora)) for d in (run / "final" / "ema", run / "final"))
    assert ema.keys() == raw.keys() and any(not torch.equal(ema[k], raw[k]) for k in ema)
    assert trained_settings(run / "final" / "ema").guidance == 2.5  # the run's own settings
    grid = tmp_path / "grid.png"
    argv = ["sample", "--task", "sd", "--model", str(parts / "sd"), "--lora",
            str(run / "final" / "ema"), "--num-samples", "1", "--num-steps", "2",
            "--device", "cpu", "--out", str(grid)]  # fmt: skip
    assert main(argv) == 0 and grid.stat().st_size > 1000


def test_a_trailing_scheduler_is_trained_and_rendered_at_leading_spacing(parts, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    import json
    import shutil

    from diffusers import StableDiffusionPipeline

    from sqdf.cli import main
    from sqdf.core.schedule import make_ddim_schedule

    model = tmp_path / "sd"
    shutil.copytree(parts / "sd", model)
    path = model / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "timestep_spacing": "trailing"}))
    run = train(config(parts, steps=1, task_params={"model": str(model)}), tmp_path / "run",
                progress=False)  # fmt: skip
    leading = make_ddim_schedule(4, eta=1.0).timesteps
    assert torch.equal(
        build_task(config(parts, task_params={"model": str(model)})).schedule.timesteps, leading
    )
    seen, real_call = [], StableDiffusionPipeline.__call__

    def recording(pipe, prompt, **kw):
        out = real_call(pipe, prompt, **kw)
        seen.append(pipe.scheduler.timesteps.tolist())
        return out

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", recording)
    argv = ["sample", "--task", "sd", "--model", str(model), "--lora", str(run / "final"),
            "--num-samples", "1", "--device", "cpu", "--out", str(tmp_path / "g.png")]  # fmt: skip
    assert main(argv) == 0
    assert seen and all(t == leading.tolist() for t in seen)  # the run's 4 DDIM steps, leading
