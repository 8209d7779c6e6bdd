"""A training-free soft value with the posterior's spread: the Gaussian posterior estimator.

SQDF's training-free Q, r(E[x0 | x]), drops the spread of the posterior p(x0 | x): the soft
value α log E[exp(r(x0)/α) | x] is larger by about Var[r | x] / (2α) (the reward's spread
pays at the temperature α), and for a curved reward E[r | x] differs from r(E[x0 | x]) too.
This estimator keeps the spread to second order: it draws K samples from the Gaussian with
the posterior's mean and covariance, both read from the reference's denoiser alone (second-
order Tweedie: for x = a x0 + b ε,

    Cov[x0 | x] = (b² / a) ∂E[x0 | x] / ∂x,

the Jacobian of the posterior mean), and combines their rewards by log-mean-exp:

    V(x) ≈ α log (1/K) Σ_k exp(r(x̂0 + L z_k) / α),   L Lᵀ = Cov[x0 | x],  z_k ~ N(0, I).

It is exact where the posterior is Gaussian (K → ∞); a multimodal posterior keeps only its
first two moments. The full Jacobian costs D backward passes through the denoiser, so the full
covariance is for small samples (D <= MAX_DIM): the instrument that measures how much of the
Q-estimate's bias the posterior's spread explains.

At any size, the isotropic covariance v·I keeps the spread's mean level alone,

    v = (b² / a) tr(∂E[x0 | x] / ∂x) / D,

with the trace read by Hutchinson's estimator, the mean of zᵀ J z over P Rademacher probes z:
P backward passes through the denoiser. Its relative error is about
√(2/P) ‖offdiag J‖_F / tr J: small where the posterior's correlations are weak, but not
falling as 1/√D where they are strong (on digits, 256 pixels, one probe's standard deviation
is 16-30 % of the trace, median over states: benchmarks/posterior_trace.py). Where an inexact
denoiser's Jacobian has a negative trace (digits: 3-4 states of 8 in the first steps), v is
clamped at 0: Tweedie's value.

By default v is taken without its own gradient: the value's gradient runs through the
posterior's mean and the draws alone, which spares a second derivative of the denoiser that
fused attention kernels do not provide. Then, for a linear reward, the gradient is exactly
Tweedie's (the log-mean-exp over draws about the mean moves with the mean alone), and the
spread acts only through a curved reward. ``keep_graph`` keeps v's gradient, the pull towards
states whose posterior is wider (to second order, ‖∇r‖² ∇v / (2α)), as the full covariance has
it, at the price of a double backward pass through the denoiser. Measured on gmm2d
(benchmarks/posterior_gradient.py) it does not pay: with one or four probes its gradient is
no nearer the exact soft value's than with v held, so it is a parameter of this function for
that measurement, not a training setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

MAX_DIM = 64  # D backward passes per evaluation: beyond a few dozen, not a training-time cost


def tweedie_covariance(
    x0_fn: Callable[[Tensor], Tensor], x: Tensor, scale: Tensor, spread: Tensor
) -> tuple[Tensor, Tensor]:
    """(E[x0 | x], Cov[x0 | x]) from a posterior-mean function of the noisy state, for
    x = scale · x0 + spread · ε; differentiable in x (the Jacobian keeps its graph).

    # x: (B, *S) with D = prod(S) <= MAX_DIM; scale, spread: (B,); returns (B, D), (B, D, D)
    """
    dim = x[0].numel()
    if dim > MAX_DIM:
        raise ValueError(f"the posterior covariance needs D <= {MAX_DIM} dimensions, got {dim}")
    if not x.requires_grad:  # a frozen input still needs the Jacobian of x̂0 in it
        x = x.detach().requires_grad_(True)
    mean = x0_fn(x).flatten(1)  # each sample's x̂0 depends on its own x alone
    rows = [
        torch.autograd.grad(mean[:, i].sum(), x, create_graph=True)[0].flatten(1)
        for i in range(dim)
    ]  # fmt: skip
    jac = torch.stack(rows, dim=1)  # (B, D, D): d mean_i / d x_j
    factor = (spread.double() ** 2 / scale.double()).to(x.dtype).view(-1, 1, 1)
    cov = factor * 0.5 * (jac + jac.transpose(1, 2))  # symmetric for an exact denoiser
    return mean, cov


def covariance_root(cov: Tensor) -> Tensor:
    """L with L Lᵀ ≈ cov: Cholesky with a jitter of 1e-6 of the mean variance; where a
    (learned, inexact) covariance is not positive definite, the root of its clamped diagonal.

    # cov: (B, D, D) -> (B, D, D)
    """
    dim = cov.shape[-1]
    eye = torch.eye(dim, dtype=cov.dtype, device=cov.device)
    level = cov.diagonal(dim1=-2, dim2=-1).mean(-1).abs().clamp(min=1e-12)
    chol, info = torch.linalg.cholesky_ex(cov + 1e-6 * level.view(-1, 1, 1) * eye)
    bad = info != 0
    if bool(bad.any()):
        diag = torch.diag_embed(cov.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt())
        chol = torch.where(bad.view(-1, 1, 1), diag, chol)
    return chol


def gaussian_soft_value(
    reward_fn: Callable[[Tensor], Tensor], mean: Tensor, cov: Tensor, alpha: float, z: Tensor
) -> Tensor:
    """α log (1/K) Σ_k exp(r(mean + L z_k)/α) with L Lᵀ = cov; reward_fn takes (N, D).

    # mean: (B, D); cov: (B, D, D); z: (B, K, D) standard normal; returns (B,)
    """
    draws = mean[:, None, :] + torch.einsum("bij,bkj->bki", covariance_root(cov), z)
    return log_mean_exp_value(reward_fn, draws, alpha)


def tweedie_isotropic_variance(
    x0_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    scale: Tensor,
    spread: Tensor,
    probes: Tensor,
    keep_graph: bool = False,
) -> tuple[Tensor, Tensor]:
    """(E[x0 | x], v) with v = (spread² / scale) mean_p(z_pᵀ J z_p) / D, J = ∂E[x0 | x]/∂x:
    Hutchinson's estimate of the posterior's mean variance tr Cov[x0 | x] / D from P probes a
    sample, one backward pass each. The mean keeps its graph; v is clamped at 0 and detached,
    or, with ``keep_graph``, differentiable in x (its backward is a second derivative of x0_fn).

    # x: (B, *S); scale, spread: (B,); probes: (B, P, D) Rademacher; returns (B, D), (B,)
    """
    if not x.requires_grad:  # a frozen input still needs the vector-Jacobian product in it
        x = x.detach().requires_grad_(True)
    with torch.enable_grad():  # the product needs the denoiser's graph, whatever the caller's mode
        mean = x0_fn(x).flatten(1)
        b, d = mean.shape
        if probes.dim() != 3 or probes.shape[0] != b or probes.shape[2] != d:
            raise ValueError(f"probes must have the shape ({b}, P, {d}), got {tuple(probes.shape)}")
        trace = torch.zeros(b, dtype=torch.float64, device=mean.device)
        for p in range(probes.shape[1]):
            z = probes[:, p]
            (vjp,) = torch.autograd.grad(
                mean, x, grad_outputs=z, retain_graph=True, create_graph=keep_graph
            )
            reading = (vjp.flatten(1) * z).sum(1).double()
            trace = trace + (reading if keep_graph else reading.detach())
    factor = spread.double() ** 2 / scale.double() / (d * probes.shape[1])
    return mean, (factor * trace).clamp(min=0).to(mean.dtype)


def isotropic_soft_value(
    reward_fn: Callable[[Tensor], Tensor], mean: Tensor, var: Tensor, alpha: float, z: Tensor
) -> Tensor:
    """α log (1/K) Σ_k exp(r(mean + √v z_k)/α); reward_fn takes (N, D).

    # mean: (B, D); var: (B,); z: (B, K, D) standard normal; returns (B,)
    """
    return log_mean_exp_value(reward_fn, mean[:, None, :] + var.sqrt()[:, None, None] * z, alpha)


def log_mean_exp_value(
    reward_fn: Callable[[Tensor], Tensor], draws: Tensor, alpha: float
) -> Tensor:
    """α log (1/K) Σ_k exp(r(draw_k)/α) over each row's K draws.

    # draws: (B, K, D); returns (B,)
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    b, k, d = draws.shape
    r = reward_fn(draws.reshape(b * k, d)).view(b, k)
    return alpha * (torch.logsumexp(r / alpha, dim=1) - math.log(k))
