"""The differentiable proxy of the oracle: a bootstrap ensemble of small networks on frozen
features, giving a mean and a spread (the ensemble's disagreement, large where the queried
data are thin). Fine-tuning maximises an optimistic proxy: the upper confidence bound
``mean + kappa * std`` (SEIKO's UCB) or one bootstrap member (a Thompson-like draw).

Features are frozen so the proxy is a small regression that a few hundred queries can fit:
the raw coordinates for gmm2d, the independent evaluator's penultimate activations for
digits (a network the oracle and the proxy both do not own; gradients flow through it to the
pixels), and the CLIP image embeddings of the reward model for Stable Diffusion (as SEIKO's
aesthetic experiment: a proxy on the embeddings the aesthetic head reads).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import InitVar, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sqdf.errors import SqdfError

FeatureMap = Callable[[Tensor], Tensor]  # reward-space samples (B, ...) -> (B, D), differentiable


def feature_map(task: Any, task_name: str) -> tuple[FeatureMap, int]:
    """The task's frozen features and their dimension."""
    if task_name == "gmm2d":
        return (lambda x: x), 2
    if task_name == "digits":
        from sqdf.evaluators import DigitEvaluator

        judge = DigitEvaluator.load(task.device)
        # not judge.features(): that one runs without gradients, in chunks, on the CPU
        return (lambda images: judge.model.features(judge.prepare(images))), 256
    if task_name == "sd":
        clip = getattr(task.reward_model, "clip_model", None)
        if clip is None:
            raise SqdfError(
                f"sqdf bbo on sd fits its proxy on the reward's CLIP image embeddings; reward "
                f"{getattr(task.reward_model, 'name', '?')!r} has none (use aesthetic, "
                "pickscore or clipscore as the task reward; a module:function oracle may "
                "still be the oracle)"
            )
        return clip.image_features, int(clip.model.config.projection_dim)
    raise SqdfError(f"sqdf bbo has no proxy features for task {task_name!r}")


class ProxyEnsemble(nn.Module):
    """M one-hidden-layer MLPs on standardised features, member m fitted to its own bootstrap
    resample of the data. All members run as one batched matrix product."""

    def __init__(self, dim: int, members: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(members, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(members, 1, hidden))
        self.w2 = nn.Parameter(torch.zeros(members, hidden, 1))
        self.b2 = nn.Parameter(torch.zeros(members, 1, 1))
        self.register_buffer("x_mean", torch.zeros(dim))
        self.register_buffer("x_std", torch.ones(dim))
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_std", torch.ones(()))

    @property
    def members(self) -> int:
        return self.w1.shape[0]

    def member_values(self, feats: Tensor) -> Tensor:
        """Every member's prediction, in the oracle's units; (M, B).

        # feats: (B, D)
        """
        z = ((feats - self.x_mean) / self.x_std).unsqueeze(0).expand(self.members, -1, -1)
        return self._standardised(z) * self.y_std + self.y_mean

    def _standardised(self, z: Tensor) -> Tensor:
        # z: (M, B, D) -> (M, B)
        h = F.silu(torch.baddbmm(self.b1, z, self.w1))
        return torch.baddbmm(self.b2, h, self.w2).squeeze(-1)

    def mean_std(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        values = self.member_values(feats)
        return values.mean(0), values.std(0)

    def fit(
        self,
        feats: Tensor,
        values: Tensor,
        generator: torch.Generator,
        *,
        steps: int,
        lr: float,
        weight_decay: float,
    ) -> float:
        """Fit every member from a fresh initialisation on its bootstrap resample of
        (feats, values); returns the mean in-sample squared error of the ensemble mean.

        # feats: (N, D); values: (N,)
        """
        feats, values = feats.detach().float(), values.detach().float().to(feats.device)
        n, dim = feats.shape
        m, hidden = self.members, self.w1.shape[2]
        with torch.no_grad():
            self.x_mean.copy_(feats.mean(0))
            # dead features (a ReLU unit that is zero on every sample) keep unit scale: a
            # sample that wakes one must not have it multiplied by 1 / (a zero spread)
            spread = feats.std(0) if n > 1 else torch.zeros(dim, device=feats.device)
            self.x_std.copy_(torch.where(spread > 1e-6, spread, torch.ones_like(spread)))
            self.y_mean.copy_(values.mean())
            self.y_std.copy_(values.std().clamp(min=1e-6) if n > 1 else torch.ones(()))
            for p, fan_in in ((self.w1, dim), (self.w2, hidden)):
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
            self.b1.zero_()
            self.b2.zero_()
        idx = torch.randint(0, n, (m, n), generator=generator).to(feats.device)
        z = ((feats - self.x_mean) / self.x_std)[idx]  # (M, N, D): member m's resample
        y = ((values - self.y_mean) / self.y_std)[idx]  # (M, N)
        params = [self.w1, self.b1, self.w2, self.b2]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                # each member's own mean squared error, summed so each gets its own gradient
                loss = (self._standardised(z) - y).pow(2).mean(1).sum()
                loss.backward()
                opt.step()
        for p in params:
            p.requires_grad_(False)  # frozen: fine-tuning differentiates through, never into it
        with torch.no_grad():
            return float((self.mean_std(feats)[0] - values).pow(2).mean())


@dataclass
class ProxyReward:
    """The optimistic proxy as a reward: ``mean + kappa * std`` over the ensemble, or, with
    ``member`` set, that one bootstrap member. Its fields are what config.json records."""

    kappa: float
    member: int | None
    ensemble: InitVar[ProxyEnsemble]
    features: InitVar[FeatureMap]
    name = "proxy"
    domain = "any"

    def __post_init__(self, ensemble: ProxyEnsemble, features: FeatureMap) -> None:
        self._ensemble = ensemble
        self._features = features

    def __call__(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        values = self._ensemble.member_values(self._features(x))
        if self.member is not None:
            return values[self.member]
        return values.mean(0) + self.kappa * values.std(0)
