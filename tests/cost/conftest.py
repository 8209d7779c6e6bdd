"""A config-only tiny SD 1.5-shaped folder and a tiny CLIP for the cost tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY_CLIP = {
    "projection_dim": 16,
    "text_config": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "vocab_size": 100, "bos_token_id": 98,
                    "eos_token_id": 99, "pad_token_id": 99},
    "vision_config": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
}  # fmt: skip


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    """A config-only tiny SD folder (the sizes of sqdf.tasks.sd_random's tiny preset)."""
    from diffusers import DDIMScheduler

    from sqdf.tasks.sd_random import _unet_config

    root = tmp_path_factory.mktemp("tiny")
    index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}  # fmt: skip
    (root / "model_index.json").write_text(json.dumps(index))
    unet = _unet_config("tiny")
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16],
               down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
               norm_num_groups=8, sample_size=16)  # fmt: skip
    text = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 100, "model_type": "clip_text_model",
            "bos_token_id": 98, "eos_token_id": 99, "pad_token_id": 99}  # fmt: skip
    for sub, config in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        (root / sub).mkdir()
        (root / sub / "config.json").write_text(json.dumps(config))
    (root / "tokenizer").mkdir()
    DDIMScheduler(beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                  clip_sample=False).save_pretrained(str(root / "scheduler"))  # fmt: skip
    return root


def _tiny_component(sub: str, config: dict) -> dict:
    """A full-size shipped component shrunk to the tiny sizes of sqdf.tasks.sd_random (its
    class, latent channels, scaling and conditioning kept): a trace of it runs the same calls
    on far fewer ops."""
    from sqdf.tasks.sd_random import _unet_config

    cls = config.get("_class_name", "")
    if sub == "unet":
        tiny = _unet_config("tiny-xl" if "addition_embed_type" in config else "tiny")
        return {"_class_name": cls, "in_channels": config["in_channels"],
                "out_channels": config["out_channels"], **tiny}  # fmt: skip
    if cls == "SD3Transformer2DModel":
        return {**config, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 4,
                "joint_attention_dim": 96, "caption_projection_dim": 32,
                "pooled_projection_dim": 32, "dual_attention_layers": [0]}  # fmt: skip
    if cls == "FluxTransformer2DModel":
        return {**config, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8,
                "num_attention_heads": 2, "joint_attention_dim": 48, "pooled_projection_dim": 32,
                "axes_dims_rope": [2, 2, 4]}  # fmt: skip
    if cls == "AutoencoderKL":
        return {**config, "block_out_channels": [8, 16], "layers_per_block": 1,
                "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 8}  # fmt: skip
    return config  # text encoders: only their bytes are read, from a model built on meta


@pytest.fixture
def tiny_shipped(monkeypatch):
    """The shipped configs (sqdf/assets/model_configs) shrunk to tiny networks of the same
    classes, and TINY_CLIP as the reward's CLIP: a preset's offline dry run then traces in
    seconds through every step a full-size one takes."""
    import sqdf.cost.model_configs as shipped

    real = shipped.read_shipped

    def tiny(name: str) -> dict:
        config = real(name)
        if name == shipped.REWARD_CLIP:
            return {**config, "config": TINY_CLIP, "head": [16, 8, 1]}
        comps = {sub: _tiny_component(sub, c) for sub, c in config["components"].items()}
        return {**config, "components": comps}

    monkeypatch.setattr(shipped, "read_shipped", tiny)
