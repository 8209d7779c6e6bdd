"""Distribution metrics against an exact target: mode-weight total variation, sliced W2."""

from __future__ import annotations

import torch
from torch import Tensor

from sqdf.core.gmm import GaussianMixture


def mode_frequencies(samples: Tensor, gmm: GaussianMixture) -> Tensor:
    """Fraction of samples whose most responsible component of ``gmm`` is k; (K,)."""
    assign = gmm.responsibilities(samples.to(gmm.means.dtype)).argmax(dim=-1)
    counts = torch.bincount(assign, minlength=gmm.weights.shape[0]).to(gmm.weights.dtype)
    return counts / samples.shape[0]


def mode_tv(samples: Tensor, gmm: GaussianMixture) -> float:
    """Total variation between the samples' mode-assignment frequencies and gmm's weights."""
    return 0.5 * float((mode_frequencies(samples, gmm) - gmm.weights).abs().sum())


def sliced_w2(
    a: Tensor, b: Tensor, generator: torch.Generator, num_projections: int = 256
) -> float:
    """Sliced Wasserstein-2 between two equal-size sample sets.

    # a, b: (N, D). Exact 1-D W2 per random direction (sorted projections), averaged in
    # squared form over directions, then square-rooted.
    """
    if a.shape != b.shape:
        raise ValueError(f"sliced_w2 needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    dirs = torch.randn(a.shape[1], num_projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = (a @ dirs).sort(dim=0)
    pb, _ = (b @ dirs).sort(dim=0)
    return float((pa - pb).pow(2).mean().sqrt())
