"""Rewards by name. Each is a dataclass (its fields are the reward's parameters, checked on
construction) whose instances map (x0, cond) to one value per sample. ``domain`` says what
it scores: "points" (gmm2d), "image" (digits, [0, 1] pixels), "rgb" (sd: (B, 3, H, W) in
[0, 1] with the prompts as strings), "pixels" (either kind of image) or "any";
``differentiable`` (default True) whether its gradient reaches the samples. A name of the
form ``module:function`` is a user's own reward (``sqdf.rewards.custom``);
``NAME=WEIGHT,NAME=WEIGHT`` a weighted sum of rewards (``sqdf.rewards.mixture``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sqdf.config.params import build_settings, suggest
from sqdf.errors import ConfigError
from sqdf.rewards.analytic import LinearReward, QuadraticReward
from sqdf.rewards.clip_rewards import (
    AestheticReward,
    ClipScoreReward,
    HPSv2Reward,
    PickScoreReward,
)
from sqdf.rewards.custom import CustomReward
from sqdf.rewards.digit_classifier import ClassifierReward
from sqdf.rewards.image_reward import ImageRewardReward
from sqdf.rewards.image_stats import InkReward, JpegCompressibility
from sqdf.rewards.mixture import (
    WeightedReward,
    common_domain,
    parse_mixture,
    reward_of,
    split_params,
)

REWARDS: dict[str, type] = {
    "linear": LinearReward,
    "quadratic": QuadraticReward,
    "ink": InkReward,
    "classifier": ClassifierReward,
    "aesthetic": AestheticReward,
    "pickscore": PickScoreReward,
    "clipscore": ClipScoreReward,
    "hpsv2": HPSv2Reward,
    "imagereward": ImageRewardReward,
    "jpeg": JpegCompressibility,
}


# asked for by name, with the reason it is not offered
UNAVAILABLE: dict[str, str] = {}


def reward_domain(name: str) -> str:
    """What reward ``name`` (or a mixture) scores (see the module docstring), without
    building it."""
    weights = parse_mixture(name)
    if weights is not None:
        return common_domain([reward_domain(reward_of(n)) for n in weights]) or "any"
    return "any" if ":" in name or name not in REWARDS else REWARDS[name].domain


def is_differentiable(name: str, params: Mapping[str, Any]) -> bool:
    """Whether reward ``name`` with ``params`` has a gradient that reaches the samples,
    without building it: a reward says not by ``differentiable = False``, a user's
    module:function by the parameter ``differentiable=false``, a mixture if any of its
    rewards does."""
    weights = parse_mixture(name)
    if weights is not None:
        per_reward = split_params(weights, params)
        return all(is_differentiable(reward_of(n), per_reward[n]) for n in weights)
    if ":" in name:
        return params.get("differentiable", True) is not False
    return bool(getattr(REWARDS.get(name), "differentiable", True))


def build_reward(name: str, params: Mapping[str, Any]) -> Any:
    """Instantiate reward ``name`` (or a ``NAME=WEIGHT,...`` mixture) with ``params``; bad
    names, keys or values raise ConfigError."""
    weights = parse_mixture(name)
    if weights is not None:
        per_reward = split_params(weights, params)
        built = {n: build_reward(reward_of(n), per_reward[n]) for n in weights}
        return WeightedReward(weights, built)
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


def mixture_components(reward: Any) -> dict[str, Any]:
    """A built mixture's rewards by name (each scored on its own in evaluation); {} for a
    single reward."""
    return dict(reward.rewards) if isinstance(reward, WeightedReward) else {}


def reward_params(reward: Any) -> dict[str, Any]:
    """The resolved parameters of a built reward (for config.json)."""
    if isinstance(reward, WeightedReward):
        return {name: reward_params(r) for name, r in reward.rewards.items()}
    if isinstance(reward, CustomReward):
        return {"spec": reward.spec, "differentiable": reward.differentiable, **reward.params}
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(reward).items()
    }
