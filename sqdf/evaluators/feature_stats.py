"""Statistics of feature sets: Fréchet distance, mean pairwise distance and the Vendi score.

Pure float64 tensor math on (N, D) features, no I/O, so each is testable against a closed
form or a brute-force definition.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _as_feature_matrix(feats: Tensor, name: str, min_rows: int) -> Tensor:
    if feats.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {tuple(feats.shape)}")
    if feats.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {feats.shape[0]}")
    return feats.detach().to(device="cpu", dtype=torch.float64)


def _sqrtm_psd(m: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix."""
    # Round-off leaves eigenvalues of a singular covariance slightly below 0; their true
    # value is 0, and a negative one would give a NaN root.
    eigvals, eigvecs = torch.linalg.eigh(m)
    return (eigvecs * eigvals.clamp(min=0.0).sqrt()) @ eigvecs.T


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (as in FID).

    ||mu_a - mu_b||² + tr(S_a + S_b - 2 (S_a^½ S_b S_a^½)^½), with unbiased covariances.
    """
    # feats_a: (N, D), feats_b: (M, D)
    a = _as_feature_matrix(feats_a, "feats_a", 2)
    b = _as_feature_matrix(feats_b, "feats_b", 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} and {b.shape[1]}")
    dim = a.shape[1]
    mean_diff = a.mean(dim=0) - b.mean(dim=0)
    # torch.cov returns a scalar for D = 1; reshape keeps the matrix algebra uniform.
    cov_a, cov_b = torch.cov(a.T).reshape(dim, dim), torch.cov(b.T).reshape(dim, dim)
    root_a = _sqrtm_psd(cov_a)
    # S_a^½ S_b S_a^½ is symmetric PSD (unlike S_a S_b), so eigh applies; it has the same
    # eigenvalues as S_a S_b, so the trace term is symmetric in a and b.
    middle = root_a @ cov_b @ root_a
    middle = 0.5 * (middle + middle.T)
    trace_cross = torch.linalg.eigvalsh(middle).clamp(min=0.0).sqrt().sum()
    distance = mean_diff @ mean_diff + cov_a.trace() + cov_b.trace() - 2.0 * trace_cross
    # A value below 0 is round-off of two equal distributions.
    return max(float(distance), 0.0)


def mean_pairwise_distance(feats: Tensor) -> float:
    """Mean Euclidean distance over all pairs i < j: a diversity measure."""
    # feats: (N, D)
    x = _as_feature_matrix(feats, "feats", 2)
    return float(torch.pdist(x).mean())


def vendi_score(feats: Tensor) -> float:
    """Vendi score (Friedman & Dieng, 2023) with the cosine-similarity kernel.

    exp of the Shannon entropy of the eigenvalues of K / N; between 1 (all alike) and N.
    """
    # feats: (N, D)
    x = _as_feature_matrix(feats, "feats", 1)
    norms = x.norm(dim=1, keepdim=True)
    is_zero = norms == 0
    unit = torch.where(is_zero, torch.zeros_like(x), x / norms.clamp(min=1e-300))
    # Cosine similarity is undefined for a zero vector. An extra coordinate, 1 on zero rows,
    # makes zero vectors identical to each other and orthogonal to the rest, so K stays PSD
    # with a unit diagonal and identical features still count as one.
    unit = torch.cat([unit, is_zero.to(unit.dtype)], dim=1)
    n = unit.shape[0]
    # K / N = U Uᵀ / N shares its non-zero eigenvalues with Uᵀ U / N; take the smaller matrix.
    gram = unit @ unit.T if n <= unit.shape[1] else unit.T @ unit
    eigvals = torch.linalg.eigvalsh(gram / n).clamp(min=0.0)
    eigvals = eigvals[eigvals > 0]
    entropy = -(eigvals * eigvals.log()).sum()
    return math.exp(float(entropy))
