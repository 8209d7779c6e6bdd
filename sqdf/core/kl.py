"""Gaussian denoising steps: the exact KL between two that share their standard deviation,
and the log-likelihood of a sampled step."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gaussian_kl(mean_p: Tensor, mean_q: Tensor, std: Tensor) -> Tensor:
    """KL( N(mean_p, std² I) || N(mean_q, std² I) ) per sample: ||mean_p - mean_q||² / (2 std²).

    # mean_p, mean_q: (B, ...); std: scalar or broadcasting against them; returns (B,)
    Convention: the exact KL, summed over all dimensions. The SQDF reference implementation
    averages over the D dimensions and drops the 1/2, so its alpha equals ours times D/2:
    alpha_ours = 2 * alpha_reference / D.

    A zero std means a deterministic step, where the KL is infinite unless the means agree;
    we refuse it rather than divide by zero.
    """
    std = torch.as_tensor(std, dtype=mean_p.dtype, device=mean_p.device)
    if bool((std <= 0).any()):
        raise ValueError(
            "gaussian_kl needs std > 0 at every step; a deterministic step (eta = 0, or a "
            "final step with alpha-bar = 1) has no finite KL"
        )
    sq = (mean_p - mean_q).pow(2) / (2.0 * std.pow(2))
    return sq.flatten(1).sum(dim=1)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std² I) per sample, summed over dimensions.

    # x, mean: (B, ...); std: scalar or broadcasting; returns (B,)
    """
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).expand_as(x)
    z = (x - mean) / std
    return -(0.5 * z.pow(2) + std.log() + 0.5 * math.log(2 * math.pi)).flatten(1).sum(dim=1)
