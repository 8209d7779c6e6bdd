"""Rewards by name. Each is a dataclass (its fields are the reward's parameters, checked on
construction) whose instances map (x0, cond) to one value per sample. ``domain`` says what
it scores: "points" (gmm2d), "image" (digits, [0, 1] pixels), "rgb" (sd: (B, 3, H, W) in
[0, 1] with the prompts as strings) or "any". A name of the form
``module:function`` is a user's own reward (``sqdf.rewards.custom``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sqdf.errors import ConfigError
from sqdf.params import build_settings, suggest
from sqdf.rewards.analytic import LinearReward, QuadraticReward
from sqdf.rewards.clip_rewards import (
    AestheticReward,
    ClipScoreReward,
    HPSv2Reward,
    PickScoreReward,
)
from sqdf.rewards.custom import CustomReward
from sqdf.rewards.digit_classifier import ClassifierReward
from sqdf.rewards.image_stats import InkReward

REWARDS: dict[str, type] = {
    "linear": LinearReward,
    "quadratic": QuadraticReward,
    "ink": InkReward,
    "classifier": ClassifierReward,
    "aesthetic": AestheticReward,
    "pickscore": PickScoreReward,
    "clipscore": ClipScoreReward,
    "hpsv2": HPSv2Reward,
}


# asked for by name, with the reason it is not offered
UNAVAILABLE = {
    "imagereward": (
        "ImageReward is not offered: its model is BLIP (a ViT-L and a BERT with "
        "cross-attention) as the image-reward package builds it, and that package imports "
        "torchvision, which cannot be installed beside sqdf's torch; a rebuild of BLIP without "
        "it could not be checked against the real weights. Use pickscore, hpsv2, clipscore or "
        "aesthetic, or call ImageReward from your own module:function reward"
    ),
}


def reward_domain(name: str) -> str:
    """What reward ``name`` scores (see the module docstring), without building it."""
    return "any" if ":" in name or name not in REWARDS else REWARDS[name].domain


def build_reward(name: str, params: Mapping[str, Any]) -> Any:
    """Instantiate reward ``name`` with ``params``; bad names, keys or values raise ConfigError."""
    if ":" in name:
        return CustomReward(name, **params)
    if name.lower() in UNAVAILABLE:
        raise ConfigError(UNAVAILABLE[name.lower()])
    if name not in REWARDS:
        raise ConfigError(
            f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}, "
            f"or module:function{suggest(name, REWARDS)}"
        )
    return build_settings(REWARDS[name], dict(params), f"reward {name!r}")


def reward_params(reward: Any) -> dict[str, Any]:
    """The resolved parameters of a built reward (for config.json)."""
    if isinstance(reward, CustomReward):
        return {"spec": reward.spec, **reward.params}
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(reward).items()
    }
