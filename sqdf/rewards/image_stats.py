"""Hand-written image statistics: cheap, differentiable, and easy to over-optimise."""

from __future__ import annotations

from dataclasses import dataclass

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
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")

    def __call__(self, images: Tensor, cond: Tensor | None = None) -> Tensor:
        # images: (B, C, H, W) -> (B,)
        return self.scale * images.flatten(1).mean(dim=1)
