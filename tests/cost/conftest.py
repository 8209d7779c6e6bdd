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
