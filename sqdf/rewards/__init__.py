"""Rewards by name. Each is a dataclass (its fields are the reward's parameters, checked on
construction) whose instances map (x0, cond) to one value per sample."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sqdf.errors import ConfigError
from sqdf.rewards.analytic import LinearReward, QuadraticReward

REWARDS: dict[str, type] = {"linear": LinearReward, "quadratic": QuadraticReward}


def build_reward(name: str, params: Mapping[str, Any]) -> Any:
    """Instantiate reward ``name`` with ``params``; bad names, keys or values raise ConfigError."""
    if name not in REWARDS:
        raise ConfigError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
    cls = REWARDS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(
            f"unknown parameter {unknown[0]!r} for reward {name!r}; "
            f"known: {', '.join(sorted(known))}"
        )
    try:
        return cls(**params)
    except ValueError as err:
        raise ConfigError(f"reward {name!r}: {err}") from None


def reward_params(reward: Any) -> dict[str, Any]:
    """The resolved parameters of a built reward (for config.json)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(reward).items()
    }
