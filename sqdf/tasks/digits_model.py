"""The embedded digits backbone: a small class-conditional diffusers UNet2DModel on 16×16 digits."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DModel
from torch import Tensor

from sqdf.errors import SqdfError

IMAGE_SIZE = 16
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the "no class" embedding used for classifier-free guidance
# DDPM's linear betas over 1000 train timesteps, as in the gmm2d task.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def make_digits_unet() -> UNet2DModel:
    """The architecture of the shipped base and consistency models (1.06 M parameters)."""
    return UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        num_class_embeds=NUM_CLASSES + 1,
        norm_num_groups=8,
    )


def to_model_space(images: Tensor) -> Tensor:
    """[0, 1] pixels -> [-1, 1], the range the diffusion model works in."""
    return images * 2.0 - 1.0


def to_pixels(x: Tensor) -> Tensor:
    """Model space -> [0, 1] pixels (clamped: the decoder of a pixel model is the identity)."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def load_unet(folder: str | Path, what: str) -> UNet2DModel:
    """A UNet2DModel from a local diffusers folder; never downloads, never falls back."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SqdfError(f"{what}: no diffusers model folder at {folder} (config.json missing)")
    try:
        kind = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (ValueError, AttributeError):
        raise SqdfError(f"{what}: {folder}/config.json is not a JSON object") from None
    if kind != "UNet2DModel":
        raise SqdfError(
            f"{what}: {folder} holds a {kind or 'model of unknown type'}, not a UNet2DModel"
        )
    try:
        unet = UNet2DModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SqdfError(f"{what}: cannot load {folder}: {first}") from None
    unet.requires_grad_(False)
    return unet.eval()


def cfg_eps(unet: torch.nn.Module, x: Tensor, t: Tensor, labels: Tensor, guidance: float) -> Tensor:
    """Noise prediction with classifier-free guidance (one pass when guidance == 1)."""
    if guidance == 1.0:
        return unet(x, t, class_labels=labels).sample
    null = torch.full_like(labels, NULL_CLASS)
    both = unet(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([labels, null])).sample
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)
