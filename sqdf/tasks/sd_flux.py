"""FLUX.1's latent layout: its transformer reads the (B, C, H, W) latents as a sequence of
2×2 patches (B, H/2 · W/2, 4C), each with its (0, row, column) position for the rotary
embedding, and the prompt's tokens at position (0, 0, 0). As FluxPipeline's
``_pack_latents``, ``_unpack_latents``, ``_prepare_latent_image_ids`` and ``text_ids``.

sqdf keeps its samples unpacked, (C, H, W) as every other family's: the packing is a
permutation of the same numbers, so the Gaussian kernel, its KL over D dimensions and the
VAE decode are unchanged; only the transformer call packs and unpacks."""

from __future__ import annotations

import torch
from torch import Tensor


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 · W/2, 4C): 2×2 patches in row-major order, each's channels
    ordered (channel, row in patch, column in patch)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """(B, H/2 · W/2, 4C) -> (B, C, H, W), the inverse of :func:`pack_latents`."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def latent_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(H/2 · W/2, 3): each patch's (0, row, column), in :func:`pack_latents`' order."""
    rows = torch.arange(h // 2).view(-1, 1).expand(-1, w // 2)
    cols = torch.arange(w // 2).view(1, -1).expand(h // 2, -1)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def text_ids(length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(L, 3) zeros: FLUX gives the prompt's tokens no position."""
    return torch.zeros(length, 3, device=device, dtype=dtype)
