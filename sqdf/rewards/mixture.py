"""A weighted sum of rewards, named on the command line as ``NAME=WEIGHT,NAME=WEIGHT``
(``--reward aesthetic=1.0,hpsv2=0.5``): r(x, c) = sum_i w_i r_i(x, c).

Training and SQDF's soft Q see only the sum; each component is kept by name so that runs log
and evaluate it separately. A component's parameters are ``NAME.KEY`` (``--reward-param
hpsv2.version=v2.1``, or a ``[reward_params.hpsv2]`` table in a config file). One reward
twice needs a label on each: ``linear#a=0.5,linear#b=2`` with ``linear#a.b=[1.0, 0.0]``.

A mixture of linear rewards is itself linear (b = sum_i w_i b_i), so on gmm2d it keeps the
closed-form optimum the benchmark measures against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from sqdf.errors import ConfigError
from sqdf.rewards.analytic import LinearReward


def parse_mixture(spec: str) -> dict[str, float] | None:
    """``NAME=WEIGHT,...`` -> {name: weight} in the order given (a name may be NAME#LABEL);
    None for a single reward name. A weight that is not a finite number, an empty name or
    label, or a name given twice is one line."""
    if "=" not in spec:
        return None
    weights: dict[str, float] = {}
    for item in spec.split(","):
        name, sep, text = item.strip().rpartition("=")
        name = name.strip()
        reward, hash_, label = name.partition("#")
        if not sep or not reward.strip() or (hash_ and not label.strip()) or "=" in name:
            raise ConfigError(f"reward mixture {spec!r}: {item.strip()!r} is not NAME=WEIGHT")
        try:
            weight = float(text)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ConfigError(
                f"reward mixture {spec!r}: the weight of {name!r} must be a finite number, "
                f"got {text.strip()!r}"
            )
        if name in weights:
            raise ConfigError(
                f"reward mixture {spec!r} names {name!r} twice (label each: {name}#a, {name}#b)"
            )
        weights[name] = weight
    return weights


def reward_of(component: str) -> str:
    """The reward a mixture component names: NAME of NAME#LABEL."""
    return component.partition("#")[0].strip()


def split_params(weights: Mapping[str, float], params: Mapping[str, Any]) -> dict[str, dict]:
    """A mixture's parameters per component: ``{NAME: {KEY: V}}`` tables (a config file) and
    ``NAME.KEY`` keys (flags; these win where both set one key)."""
    out: dict[str, dict] = {name: {} for name in weights}

    def component(name: str) -> dict:
        if name not in out:
            raise ConfigError(
                f"reward parameter for {name!r}, which is not in the mixture ({', '.join(weights)})"
            )
        return out[name]

    def owner(key: str) -> str | None:
        # the longest component NAME with NAME.KEY = key: a module:function may hold dots
        names = [n for n in out if key.startswith(n + ".")]
        return max(names, key=len) if names else None

    dotted = {k: v for k, v in params.items() if k not in out and "." in k}
    for key, value in params.items():
        if key in dotted:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"reward parameter {key!r}: a mixture's parameters name their reward, as "
                f"NAME.KEY=VALUE (for example {next(iter(weights))}.{key}=...)"
            )
        component(key).update(value)
    for key, value in dotted.items():
        name = owner(key) or key.partition(".")[0]
        component(name)[key[len(name) + 1 :]] = value
    return out


def common_domain(domains: list[str]) -> str | None:
    """The kind of sample every one of ``domains`` scores ("any" and "pixels" fit more than
    one), or None when there is none."""
    kinds = set(domains) - {"any"}
    if len(kinds) > 1:
        kinds -= {"pixels"}  # any image: fits "image" and "rgb" alike
    if len(kinds) > 1:
        return None
    return kinds.pop() if kinds else "any"


class WeightedReward:
    """sum_i w_i r_i over built rewards (name -> reward), all scoring the same kind of sample."""

    def __init__(self, weights: Mapping[str, float], rewards: Mapping[str, Any]):
        self.weights = dict(weights)
        self.rewards = dict(rewards)
        domain = common_domain([getattr(r, "domain", "any") for r in self.rewards.values()])
        if domain is None:
            raise ConfigError(
                "a reward mixture's rewards must score the same kind of sample; these score "
                + ", ".join(f"{n}: {getattr(r, 'domain', 'any')}" for n, r in self.rewards.items())
            )
        self.domain = domain
        self.differentiable = all(getattr(r, "differentiable", True) for r in rewards.values())
        self.name = ",".join(f"{n}={w!r}" for n, w in self.weights.items())  # weights exact
        if all(isinstance(r, LinearReward) for r in self.rewards.values()):
            self._take_closed_form(self._as_linear())

    def _as_linear(self) -> LinearReward:
        dims = {len(r.b) for r in self.rewards.values()}
        if len(dims) > 1:
            raise ConfigError(f"reward mixture {self.name!r}: its b vectors differ in length")
        b = sum(w * torch.tensor(self.rewards[n].b, dtype=torch.float64)
                for n, w in self.weights.items())  # fmt: skip
        return LinearReward(b=tuple(float(v) for v in b))

    def _take_closed_form(self, linear: LinearReward) -> None:
        # what gmm2d reads of a reward with an exact optimum
        self.b: tuple[float, ...] = linear.b
        self.tilt: Callable[..., Any] = linear.tilt
        self.log_mgf: Callable[..., Tensor] = linear.log_mgf

    @property
    def clip_model(self) -> Any:
        """The first of its rewards' CLIP models (what sd's diversity features and the BBO
        proxy read), or None."""
        for reward in self.rewards.values():
            clip = getattr(reward, "clip_model", None)
            if clip is not None:
                return clip
        return None

    def parts(self, x: Tensor, cond: Any = None) -> dict[str, Tensor]:
        """Each component's reward of ``x``, by name, (B,) each."""
        return {name: reward(x, cond) for name, reward in self.rewards.items()}

    def combine(self, parts: Mapping[str, Tensor]) -> Tensor:
        """The weighted sum of components from :meth:`parts`."""
        total = None
        for name, weight in self.weights.items():
            term = weight * parts[name]
            total = term if total is None else total + term
        assert total is not None
        return total

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        return self.combine(self.parts(x, cond))

    def enable_checkpointing(self) -> None:
        for reward in self.rewards.values():
            enable = getattr(reward, "enable_checkpointing", None)
            if enable is not None:
                enable()

    def to(self, device: torch.device) -> WeightedReward:
        for reward in self.rewards.values():
            if hasattr(reward, "to"):
                reward.to(device)
        return self
