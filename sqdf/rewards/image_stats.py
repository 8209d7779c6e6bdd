"""Image statistics: cheap, easy to over-optimise; ink is differentiable, JPEG size is not."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor


@dataclass
class InkReward:
    """How much ink a digit uses: ``scale`` × mean pixel value, images in [0, 1].

    Like an aesthetic score it prefers one look (bold strokes); pushed far enough, it
    prefers blobs to digits, which the independent evaluator catches.
    """

    scale: float = 10.0
    domain = "image"

    def __post_init__(self) -> None:
        self.scale = float(self.scale)
        if not 0 < self.scale < math.inf:
            raise ValueError(f"scale must be a finite number > 0, got {self.scale}")

    def __call__(self, images: Tensor, cond: Tensor | None = None) -> Tensor:
        # images: (B, C, H, W) -> (B,)
        return self.scale * images.flatten(1).mean(dim=1)


@dataclass
class JpegCompressibility:
    """JPEG compressibility as DDPO defines it: minus the size in kB (1000 bytes) of the image
    saved as a JPEG at ``quality`` (95 in DDPO), images in [0, 1] rounded to 8 bits.

    Not differentiable (an encoder's byte count): the policy-gradient methods (ddpo, grpo),
    best-of-N and ``sqdf bbo`` take it; the reward-gradient methods refuse it.
    """

    quality: int = 95
    domain = "pixels"  # any image: digits' one channel or sd's three
    differentiable = False

    def __post_init__(self) -> None:
        if isinstance(self.quality, bool) or not isinstance(self.quality, int):
            raise ValueError(f"quality must be an integer, got {self.quality!r}")
        if not 1 <= self.quality <= 95:  # PIL: above 95 the encoder's tables degenerate
            raise ValueError(f"quality must be in 1..95, got {self.quality}")

    @torch.no_grad()
    def __call__(self, images: Tensor, cond: Any = None) -> Tensor:
        # images: (B, C, H, W) in [0, 1], C = 1 or 3 -> (B,)
        pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
        sizes = []
        for image in pixels.permute(0, 2, 3, 1).numpy():
            buffer = io.BytesIO()
            Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
                buffer, format="JPEG", quality=self.quality
            )
            sizes.append(buffer.tell() / 1000)
        return -torch.tensor(sizes, dtype=torch.get_default_dtype(), device=images.device)
