"""The SQDF per-sample loss: discounted soft-Q reward plus the KL to the reference step."""

from __future__ import annotations

import torch
from torch import Tensor


def discount_weight(step_index: Tensor, num_steps: int, gamma: float) -> Tensor:
    """γ^(T-k-1): 1 at the last step (k = T-1), smallest at the first, noisiest step."""
    exponent = (num_steps - 1 - step_index).to(torch.float64)
    return torch.pow(torch.tensor(gamma, dtype=torch.float64), exponent).float()


def soft_q_loss(
    reward: Tensor, kl: Tensor, step_index: Tensor, num_steps: int, gamma: float, alpha: float
) -> Tensor:
    """L = -γ^(T-k-1) r(x̂0(x_{t-1})) + α KL_t, per sample.

    # reward, kl, step_index: (B,); returns (B,)
    The reward is the training-free soft Q of the action x_{t-1}: the reward of its
    posterior-mean (or consistency-model) estimate of x0. Its gradient reaches the policy
    through the reparameterised x_{t-1} = mean_θ + σ z.
    """
    weight = discount_weight(step_index, num_steps, gamma).to(reward.device, reward.dtype)
    return -weight * reward + alpha * kl
