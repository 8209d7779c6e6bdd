"""The best step a fixed-variance Gaussian policy can take, given the exact soft value.

SQDF's per-step objective with the soft value V of the next state is

    J(π) = E_{y ~ π}[V(y)] − α KL(π || p_ref(· | x)),

whose optimum over all transitions is the tilted step p_ref(y | x) exp(V(y)/α) / Z, in
general not Gaussian. SQDF's policy is a Gaussian of the reference's variance,
π = N(m, σ² I), and the reference's step is N(μ, σ² I); J over m alone is

    J(m) = E_{y ~ N(m, σ² I)}[V(y)] − α |m − μ|² / (2σ²),

stationary where

    m = μ + (σ² / α) E_{y ~ N(m, σ² I)}[∇V(y)],

the fixed point iterated here (a contraction while σ² |∇²V| < α). It is exact for a
linear V (one step from μ) and, for a quadratic V, is the tilted Gaussian's mean. Sampling
with it is where a perfectly trained SQDF policy lands with the exact V, whatever the network
and the training: the floor of what training on SQDF's objective can reach. It is not a bound
on fixed-variance Gaussian chains: other steps of the family (the first-order one below) can
land nearer the target, so a gap it leaves is the per-step objective's, not the family's.

That optimum is the reverse-KL projection of the tilted step onto the Gaussians of its
variance (J(m) = −α KL(N(m, σ² I) || tilted) + const), which leans to one side where the
tilted step straddles two modes. The moment projection, the Gaussian with the tilted step's
own mean E_tilted[y], is the other candidate: what a Gaussian step would take to carry the
tilted chain's first moment (``tilted_mean``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

MAX_QUADRATURE_DIM = 3  # points^D nodes per state: a tensor-product rule is for small D


def gauss_hermite_nodes(points: int, dim: int) -> tuple[Tensor, Tensor]:
    """Nodes (P^D, D) and weights (P^D,) of the tensor-product Gauss–Hermite rule for
    E_{z ~ N(0, I_D)}[f(z)] (weights sum to 1), in float64."""
    if dim > MAX_QUADRATURE_DIM:
        raise ValueError(f"quadrature over {dim} dimensions: at most {MAX_QUADRATURE_DIM}")
    z, w = np.polynomial.hermite_e.hermegauss(points)  # weight exp(-z²/2)
    w = w / math.sqrt(2 * math.pi)
    grids = torch.meshgrid(*[torch.from_numpy(z)] * dim, indexing="ij")
    nodes = torch.stack([g.flatten() for g in grids], dim=1)
    weights = torch.ones(len(nodes), dtype=torch.float64)
    for d in range(dim):
        weights = weights * torch.from_numpy(w)[_index(points, dim, d)]
    return nodes, weights


def _index(points: int, dim: int, d: int) -> Tensor:
    """The node index along dimension d of each tensor-product node (ij order)."""
    return (torch.arange(points**dim) // points ** (dim - 1 - d)) % points


def _column(std: Tensor | float, mean: Tensor) -> Tensor:
    """A per-sample (or shared) std as a (B, 1) column of ``mean``'s dtype and device."""
    sd = std if torch.is_tensor(std) else torch.tensor(std)
    return sd.to(mean).reshape(-1, 1).expand(mean.shape[0], 1)


def _quadrature_points(centre: Tensor, sd: Tensor, points: int) -> tuple[Tensor, Tensor]:
    """The nodes of N(centre, sd² I) for each sample, (B, P^D, D), and their weights (P^D,)."""
    nodes, weights = (t.to(centre) for t in gauss_hermite_nodes(points, centre.shape[1]))
    return centre[:, None, :] + sd[:, None, :] * nodes[None], weights


def best_gaussian_mean(
    mean: Tensor,
    std: Tensor,
    grad_value: Callable[[Tensor], Tensor],
    alpha: float,
    *,
    iters: int = 4,
    points: int = 5,
) -> tuple[Tensor, float]:
    """The mean of the fixed-variance Gaussian step that maximises J (module docstring), and
    the largest change of its last iteration (how far from the fixed point it stopped).
    ``grad_value(y)`` is ∇V at states y (N, D); E[∇V] is by Gauss–Hermite quadrature with
    ``points`` nodes a dimension. ``iters`` 0 is the first-order step μ + (σ²/α) ∇V(μ).

    # mean: (B, D); std: (B,) or scalar; returns (B, D), float
    """
    b, dim = mean.shape
    sd = _column(std, mean)
    var = sd**2
    m = mean + var / alpha * grad_value(mean)
    change = float("nan")
    for _ in range(iters):
        y, weights = _quadrature_points(m, sd, points)
        g = grad_value(y.reshape(-1, dim)).reshape(b, -1, dim)
        new = mean + var / alpha * (weights[None, :, None] * g).sum(1)
        change = float((new - m).abs().max())
        m = new
    return m, change


def tilted_mean(
    mean: Tensor,
    std: Tensor,
    value: Callable[[Tensor], Tensor],
    alpha: float,
    *,
    points: int = 7,
) -> Tensor:
    """E[y] under the tilted step N(y; μ, σ² I) exp(V(y)/α) / Z, by Gauss–Hermite quadrature
    (``points`` nodes a dimension) with self-normalised weights exp(V/α).

    # mean: (B, D); std: (B,) or scalar; value: (N, D) -> (N,); returns (B, D)
    """
    b, dim = mean.shape
    y, weights = _quadrature_points(mean, _column(std, mean), points)
    log_w = weights.log()[None] + value(y.reshape(-1, dim)).reshape(b, -1) / alpha
    return (torch.softmax(log_w, dim=1)[..., None] * y).sum(1)
