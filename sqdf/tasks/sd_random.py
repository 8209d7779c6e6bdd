"""Random-initialised Stable Diffusion parts of the real classes, written as diffusers and
transformers folders: for tests (``tiny``, ``tiny-xl``, ``tiny-sd3`` by :func:`write_random_sd3`,
``tiny-flux`` by :func:`write_random_flux`) and for speed and memory checks at full size
(``sd15``: the SD 1.5 UNet/VAE/text encoder; ``sdxl``: the SDXL base UNet, VAE and both text
encoders; ``sd35m``: SD 3.5 Medium's transformer, VAE and CLIPs; ``fluxdev``: FLUX.1-dev's
transformer, VAE, CLIP-L and a shallow T5 of T5-XXL's width; each with a CLIP ViT-L/14 reward).
Nothing is downloaded; the weights mean nothing, the shapes and the code paths are the real ones.

The CLIP tokenizer is a byte-level one with no merges (every character a token): a real
CLIPTokenizer, small enough to write here. SD3's and FLUX's T5 tokenizer is a real T5 tokenizer (the
tokenizers-backed class) over a Unigram vocabulary of single characters, built in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sqdf.rewards.clip_rewards import CLIP_MEAN, CLIP_STD

PRESETS = ("tiny", "sd15", "tiny-xl", "sdxl", "tiny-sd3", "sd35m", "tiny-flux", "fluxdev")
XL_PRESETS = ("tiny-xl", "sdxl")
SD3_PRESETS = ("tiny-sd3", "sd35m")  # write_random_sd3: tiny, or SD 3.5 Medium's sizes
FLUX_PRESETS = ("tiny-flux", "fluxdev")  # write_random_flux: tiny, or FLUX.1-dev's sizes


def _byte_chars() -> list[str]:
    """The 256 printable characters byte-level BPE (GPT-2, CLIP) stands for the bytes with."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _write_tokenizer(folder: Path, max_length: int = 77) -> int:
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {"model_max_length": max_length, "pad_token": "<|endoftext|>",
              "tokenizer_class": "CLIPTokenizer"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))  # fmt: skip
    return len(vocab)


def _text_config(preset: str, vocab: int, *, big: bool = False) -> dict:
    """CLIP text encoder sizes: tiny, CLIP ViT-L/14's (SD 1.5, SDXL's first encoder) or, with
    ``big``, OpenCLIP ViT-bigG/14's (SDXL's second)."""
    if preset.startswith("tiny"):
        sizes = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2)
        ids = dict(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
        return dict(vocab_size=vocab, num_attention_heads=4, projection_dim=16, **sizes, **ids)
    if big:
        sizes = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32)
        return dict(vocab_size=49408, num_attention_heads=20, projection_dim=1280,
                    hidden_act="gelu", **sizes)  # fmt: skip
    sizes = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12)
    return dict(vocab_size=49408, num_attention_heads=12, projection_dim=768, **sizes)


def _unet_config(preset: str) -> dict:
    """UNet2DConditionModel sizes: tiny, SD 1.5's, SDXL base's (or a tiny one shaped like it)."""
    if preset == "tiny":
        return dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=8,
        )  # fmt: skip
    if preset == "sd15":
        return dict(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            cross_attention_dim=768, attention_head_dim=8,
        )  # fmt: skip
    # SDXL: text and size conditioning added to the time embedding (6 ids of
    # addition_time_embed_dim each, plus the second text encoder's pooled projection)
    tiny = preset == "tiny-xl"
    time_dim, pooled = (8, 16) if tiny else (256, 1280)
    common = dict(
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled,
    )  # fmt: skip
    if tiny:
        return dict(
            sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4), cross_attention_dim=64, norm_num_groups=8, **common,
        )  # fmt: skip
    return dict(
        sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, **common,
    )  # fmt: skip


# SDXL base ships an EulerDiscreteScheduler config; DDIM reads the same noise levels from it
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}  # fmt: skip


def write_random_sd(folder: str | Path, preset: str = "tiny", *, seed: int = 0) -> Path:
    """A StableDiffusion folder (unet, vae, text_encoder, tokenizer, scheduler), or with an
    XL preset a StableDiffusionXL one (text_encoder_2 and tokenizer_2 as well)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if preset not in PRESETS[:4]:
        raise ValueError(f"preset must be one of {PRESETS[:4]}, got {preset!r}")
    folder = Path(folder)
    torch.manual_seed(seed)
    vocab = _write_tokenizer(folder / "tokenizer")
    text = CLIPTextModel(CLIPTextConfig(**_text_config(preset, vocab)))
    text.save_pretrained(str(folder / "text_encoder"))
    UNet2DConditionModel(**_unet_config(preset)).save_pretrained(str(folder / "unet"))
    if preset.startswith("tiny"):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8, sample_size=16,
        )  # fmt: skip
    else:
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=512,
        )  # fmt: skip
    if preset in XL_PRESETS:
        vae.register_to_config(scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE config
        if preset == "sdxl":
            vae.register_to_config(sample_size=1024)
        return _finish_sdxl(folder, preset, vae)
    vae.save_pretrained(str(folder / "vae"))
    DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    ).save_pretrained(str(folder / "scheduler"))  # fmt: skip
    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _finish_sdxl(folder: Path, preset: str, vae: Any) -> Path:
    """The second text encoder and tokenizer, VAE, scheduler and index of an SDXL folder."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    vocab = _write_tokenizer(folder / "tokenizer_2")
    config = CLIPTextConfig(**_text_config(preset, vocab, big=True))
    CLIPTextModelWithProjection(config).save_pretrained(str(folder / "text_encoder_2"))
    vae.save_pretrained(str(folder / "vae"))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER))
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def write_random_lcm_unet(folder: str | Path, preset: str = "tiny", *, seed: int = 1) -> Path:
    """An LCM UNet (a UNet2DConditionModel with a guidance embedding) for the same latents."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    proj = 16 if preset.startswith("tiny") else 256
    UNet2DConditionModel(**_unet_config(preset), time_cond_proj_dim=proj).save_pretrained(
        str(folder)
    )
    return Path(folder)


def write_random_clip(folder: str | Path, preset: str = "tiny", *, seed: int = 2) -> Path:
    """A transformers CLIPModel folder with its tokenizer and preprocessor config (tiny: 32
    px images, 16-d embeddings; sd15: the ViT-L/14 the LAION aesthetic head expects)."""
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    torch.manual_seed(seed)
    vocab = _write_tokenizer(folder)
    if preset.startswith("tiny"):
        vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                      num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
        size, proj = 32, 16
    else:
        vision = dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                      num_hidden_layers=24, num_attention_heads=16)  # fmt: skip
        size, proj = 224, 768
    text = _text_config(preset, vocab)
    text.pop("projection_dim")
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)
    ).save_pretrained(str(folder))
    pre = {"crop_size": {"height": size, "width": size}, "image_mean": list(CLIP_MEAN),
           "image_std": list(CLIP_STD)}  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder


def write_random_aesthetic_head(path: str | Path, in_dim: int, *, seed: int = 3) -> Path:
    """A head of the LAION predictor's shape (in_dim -> 1024 -> 128 -> 64 -> 16 -> 1, dropout
    between), saved as a torch state dict (.pth) the way the public head is distributed."""
    torch.manual_seed(seed)
    layers = torch.nn.Sequential(
        torch.nn.Linear(in_dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
    )  # fmt: skip
    torch.save({f"layers.{k}": v for k, v in layers.state_dict().items()}, str(path))
    return Path(path)


def write_random_lcm_lora(
    model: str | Path, out: str | Path, *, rank: int = 4, seed: int = 4
) -> Path:
    """A LoRA with random (non-zero) B on the attention projections of ``model``'s UNet,
    saved as diffusers distributes LoRAs by the folder's own pipeline class: what an
    LCM-LoRA file looks like to the sd task. Returns the .safetensors file."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from sqdf.tasks.sd import save_diffusers_lora
    from sqdf.tasks.sd_family import family_of

    unet = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet")
    torch.manual_seed(seed)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
    unet.add_adapter(config)
    return save_diffusers_lora(unet, rank, float(rank), Path(out), family_of(model))


def _write_t5_tokenizer(folder: Path) -> int:
    """A T5 tokenizer whose pieces are the printable ASCII characters, alone or starting a
    word (T5's special tokens first, as T5 numbers them: pad 0, eos 1, unk 2)."""
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -3.5) for c in chars]
    T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512).save_pretrained(str(folder))
    return len(vocab)


# a StableDiffusion3Pipeline folder's index; text_encoder_3 and tokenizer_3 are [None, None]
# in a folder without T5, which the pipeline then replaces by zeros
SD3_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "feature_extractor": [None, None], "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}  # fmt: skip


def write_random_sd3(
    folder: str | Path, *, t5: bool = True, seed: int = 0, preset: str = "tiny-sd3"
) -> Path:
    """A tiny StableDiffusion3Pipeline folder: an SD3Transformer2DModel shaped like SD 3.5
    Medium's (its first block with the second, dual attention; RMS-normed queries and keys),
    16-channel latents, CLIP-L and CLIP-G (both with their projection), T5 (or, with ``t5``
    False, none: the folder SD3 ships as ``text_encoder_3=None``), the VAE with SD3's scaling
    and shift factors, and SD3's FlowMatchEulerDiscreteScheduler (shift 3). With ``preset``
    "sd35m": SD 3.5 Medium's sizes (a 2.2 B-parameter transformer, saved in bfloat16; CLIP-L
    and CLIP-G at full size; no T5, whose 4.7 B parameters only encode prompts), for the GPU
    benchmarks."""
    if preset not in SD3_PRESETS:
        raise ValueError(f"preset must be one of {SD3_PRESETS}, got {preset!r}")
    if preset == "sd35m":
        return _write_sd35m(Path(folder), seed)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    folder = Path(folder)
    torch.manual_seed(seed)
    for n, (encoder, tokenizer) in enumerate(
        (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    ):
        vocab = _write_tokenizer(folder / tokenizer)
        config = CLIPTextConfig(
            **_text_config("tiny", vocab), hidden_act="gelu" if n else "quick_gelu"
        )
        CLIPTextModelWithProjection(config).save_pretrained(str(folder / encoder))
    # the CLIP states (32 + 32 wide) are zero-padded to T5's width, as in SD3 (768 + 1280 to 4096)
    t5_width, pooled = 96, 16 + 16
    index = dict(SD3_INDEX)
    if t5:
        vocab = _write_t5_tokenizer(folder / "tokenizer_3")
        config = T5Config(vocab_size=vocab, d_model=t5_width, d_kv=8, d_ff=37, num_layers=2,
                          num_heads=4, feed_forward_proj="gated-gelu")  # fmt: skip
        T5EncoderModel(config).save_pretrained(str(folder / "text_encoder_3"))
    else:
        index |= {"text_encoder_3": [None, None], "tokenizer_3": [None, None]}
    SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=t5_width,
        caption_projection_dim=32, pooled_projection_dim=pooled, pos_embed_max_size=16,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    ).save_pretrained(str(folder / "transformer"))  # fmt: skip
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=1.5305, shift_factor=0.0609,
    ).save_pretrained(str(folder / "vae"))  # fmt: skip
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _write_sd35m(folder: Path, seed: int) -> Path:
    """write_random_sd3 at SD 3.5 Medium's sizes (its transformer and VAE configs), no T5."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    for encoder, tokenizer, big in (("text_encoder", "tokenizer", False),
                                    ("text_encoder_2", "tokenizer_2", True)):  # fmt: skip
        vocab = _write_tokenizer(folder / tokenizer)
        config = CLIPTextConfig(**_text_config("sd15", vocab, big=big))
        CLIPTextModelWithProjection(config).save_pretrained(str(folder / encoder))
    SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    ).to(torch.bfloat16).save_pretrained(str(folder / "transformer"))  # fmt: skip
    AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=1.5305, shift_factor=0.0609,
    ).save_pretrained(str(folder / "vae"))  # fmt: skip
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(str(folder / "scheduler"))
    index = dict(SD3_INDEX) | {"text_encoder_3": [None, None], "tokenizer_3": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


FLUX_INDEX = {
    "_class_name": "FluxPipeline",
    "feature_extractor": [None, None], "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}  # fmt: skip
# FLUX.1's scheduler_config.json: the resolution-dependent shift its pipeline computes
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip


# FLUX.1-dev's transformer/config.json: 19 double-stream and 38 single-stream blocks of 24
# heads of 128, 11.9 B parameters (FLUX.1 schnell's is the same without guidance_embeds)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
# FLUX.1-dev's text_encoder_2 is T5-XXL (24 layers, 4.7 B parameters, 9.5 GB in bf16); the
# preset's has its vocabulary, width and layer shape but 2 of its layers. The transformer
# only reads 4096-wide states, and the sd task encodes the prompts once and lets the encoders
# go before training, so a gradient step's memory and an update's time do not include T5;
# all 24 layers would only lengthen writing and loading the parts (and, held beside the
# transformer while prompts are encoded, could put the CUDA peak there instead of the step)
FLUX_DEV_T5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=2,
                   num_heads=64, feed_forward_proj="gated-gelu")  # fmt: skip


def write_random_flux(
    folder: str | Path, *, guidance_embeds: bool = True, seed: int = 0, preset: str = "tiny-flux"
) -> Path:
    """A tiny FluxPipeline folder: a FluxTransformer2DModel (one double-stream and one
    single-stream block; with ``guidance_embeds`` a guidance-distilled one as FLUX.1-dev, else
    as FLUX.1 schnell), 16-channel latents packed into its 64 input channels, CLIP-L (the
    CLIPTextModel whose pooled output FLUX takes), T5 with a real T5 tokenizer, the VAE with
    FLUX's scaling and shift factors and FLUX's FlowMatchEulerDiscreteScheduler. With
    ``preset`` "fluxdev": FLUX.1-dev's sizes (:func:`fluxdev_parts`), for the GPU benchmarks."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if preset not in FLUX_PRESETS:
        raise ValueError(f"preset must be one of {FLUX_PRESETS}, got {preset!r}")
    folder = Path(folder)
    torch.manual_seed(seed)
    vocab = _write_tokenizer(folder / "tokenizer")
    t5_vocab = _write_t5_tokenizer(folder / "tokenizer_2")
    if preset == "fluxdev":
        # the weights are created where they will run, in bf16: a GPU initialises 12 B
        # parameters in seconds; a CPU needs 24 GB of memory for them
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        for sub, model in fluxdev_parts(device, guidance_embeds=guidance_embeds):
            model.save_pretrained(str(folder / sub))
    else:
        CLIPTextModel(CLIPTextConfig(**_text_config("tiny", vocab))).save_pretrained(
            str(folder / "text_encoder")
        )
        t5_width = 48
        config = T5Config(vocab_size=t5_vocab, d_model=t5_width, d_kv=8, d_ff=37, num_layers=2,
                          num_heads=4, feed_forward_proj="gated-gelu")  # fmt: skip
        T5EncoderModel(config).save_pretrained(str(folder / "text_encoder_2"))
        FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=t5_width,
            pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
        ).save_pretrained(str(folder / "transformer"))  # fmt: skip
        AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16,
            use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
            shift_factor=0.1159,
        ).save_pretrained(str(folder / "vae"))  # fmt: skip
    FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER).save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps(FLUX_INDEX))
    return folder


@contextmanager
def _created_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside create their weights on ``device`` in ``dtype`` directly (no
    float32 copy on the CPU first); on the meta device, shapes without storage."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(before)


def fluxdev_parts(
    device: torch.device, *, guidance_embeds: bool = True
) -> Iterator[tuple[str, Any]]:
    """FLUX.1-dev's networks, one at a time, as (subfolder, random-initialised model) on
    ``device``: the transformer (:data:`FLUX_DEV_TRANSFORMER`; without ``guidance_embeds``
    FLUX.1 schnell's) and the shallow T5 (:data:`FLUX_DEV_T5`) created in bfloat16, CLIP-L and
    the VAE (FLUX's: 16 latent channels, scaling 0.3611, shift 0.1159) in float32."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with _created_on(device, torch.bfloat16):
        net = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER | {"guidance_embeds": guidance_embeds})
    yield "transformer", net
    with _created_on(device, torch.bfloat16):
        t5 = T5EncoderModel(T5Config(**FLUX_DEV_T5))
    yield "text_encoder_2", t5
    with _created_on(device, torch.float32):
        clip = CLIPTextModel(CLIPTextConfig(**_text_config("sd15", 0)))  # CLIP-L, 49408 tokens
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, use_quant_conv=False,
            use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
        )  # fmt: skip
    yield "text_encoder", clip
    yield "vae", vae


CLIP_DIMS = {"tiny": 16, "sd15": 768, "tiny-xl": 16, "sdxl": 768, "tiny-sd3": 16, "sd35m": 768,
             "tiny-flux": 16, "fluxdev": 768}  # fmt: skip


def write_parts(root: str | Path, preset: str = "tiny") -> dict[str, str]:
    """Everything an sd run needs, written once under ``root`` (kept between calls): the
    model, a consistency model, a CLIP and an aesthetic head. Returns the task and reward
    params. The consistency model is an LCM UNet for the SD 1.5 presets and, for the SDXL
    ones, an LCM-LoRA (rank 64, as the public LCM-LoRA for SDXL): a second SDXL UNet would
    double the largest weights in memory. The SD 3/3.5 and FLUX.1 presets have none (their
    runs use Tweedie's x̂0)."""
    from sqdf.rewards.clip_rewards import convert_aesthetic_head

    root = Path(root)
    xl = preset in XL_PRESETS
    lcm = root / "lcm_lora" / "pytorch_lora_weights.safetensors" if xl else root / "lcm"
    if preset in SD3_PRESETS + FLUX_PRESETS:  # no consistency model (estimator tweedie)
        if not (root / "done").exists():
            if preset in SD3_PRESETS:
                write_random_sd3(root / "sd", t5=False, preset=preset)
            else:
                write_random_flux(root / "sd", preset=preset)
            write_random_clip(root / "clip", "tiny" if preset.startswith("tiny") else "sd15")
            write_random_aesthetic_head(root / "head.pth", CLIP_DIMS[preset])
            convert_aesthetic_head(root / "head.pth", root / "head.safetensors")
            (root / "done").write_text("ok")
        return {"model": str(root / "sd"), "clip": str(root / "clip"),
                "head": str(root / "head.safetensors")}  # fmt: skip
    if not (root / "done").exists():
        write_random_sd(root / "sd", preset)
        if xl:
            write_random_lcm_lora(root / "sd", root / "lcm_lora", rank=64)
        else:
            write_random_lcm_unet(root / "lcm", preset)
        write_random_clip(root / "clip", preset)
        write_random_aesthetic_head(root / "head.pth", CLIP_DIMS[preset])
        convert_aesthetic_head(root / "head.pth", root / "head.safetensors")
        (root / "done").write_text("ok")
    return {"model": str(root / "sd"), "lcm": str(lcm), "clip": str(root / "clip"),
            "head": str(root / "head.safetensors")}  # fmt: skip
