"""The settings of online black-box optimisation (``sqdf bbo``): one typed dataclass, validated
once; the CLI reuses its help. The fine-tuning itself is configured by a TrainConfig."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sqdf.config.params import check_finite
from sqdf.errors import ConfigError

OPTIMISM = ("ucb", "sample")


def _f(default: Any, help: str) -> Any:
    if isinstance(default, dict | list):
        return field(default_factory=type(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class BboConfig:
    """The oracle, the query budget (rounds x queries_per_round) and the proxy."""

    oracle: str = _f(
        "task",
        "oracle: 'task' = the task's reward, queried as plain floats; or module:function",
    )
    oracle_params: dict = _f({}, "keyword arguments of a module:function oracle")
    rounds: int = _f(4, "rounds; each spends queries_per_round oracle queries")
    queries_per_round: int = _f(64, "fresh samples sent to the oracle per round")
    query_schedule: list = _f(
        [],
        "queries of each round, one entry a round (e.g. 1024,2048,4096,8192); empty: "
        "queries_per_round in every round",
    )
    oracle_batch: int = _f(0, "samples per oracle call (0: the whole round in one call)")
    updates_per_round: int = _f(30, "optimizer updates against the proxy per round")
    drop_bad_queries: bool = _f(
        False,
        "exclude (and count) samples whose oracle value is NaN/inf, or whose oracle call "
        "failed, instead of stopping",
    )
    ensemble_size: int = _f(4, "bootstrap members of the proxy ensemble")
    proxy_hidden: int = _f(64, "hidden units of each proxy member (one hidden layer)")
    proxy_steps: int = _f(300, "full-batch Adam steps fitting each proxy member")
    proxy_lr: float = _f(1e-2, "learning rate of the proxy fit")
    proxy_weight_decay: float = _f(1e-3, "weight decay of the proxy fit")
    optimism: str = _f(
        "ucb", "ucb: mean + kappa * spread of the ensemble; sample: one bootstrap member a round"
    )
    kappa: float = _f(1.0, "UCB bonus: proxy = mean + kappa * std over the ensemble")

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            check_finite(value, f.name)
            if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            elif f.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"{f.name} must be an int, got {value!r}")
            elif f.type == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{f.name} must be true or false, got {value!r}")
            elif f.type == "list" and not isinstance(value, list | tuple):
                raise ConfigError(f"{f.name} must be a list, got {value!r}")
        need(isinstance(self.oracle, str) and bool(self.oracle), "oracle must be a name")
        need(
            self.oracle == "task" or ":" in self.oracle,
            f"oracle must be 'task' or module:function, got {self.oracle!r}",
        )
        need(isinstance(self.oracle_params, dict), "oracle_params must be a table")
        need(
            self.oracle != "task" or not self.oracle_params,
            "oracle_params are for a module:function oracle; the task oracle is the task's "
            "reward, set by reward_params",
        )
        need(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        need(
            self.queries_per_round >= 2,
            f"queries_per_round must be >= 2, got {self.queries_per_round}",
        )
        self.query_schedule = list(self.query_schedule)
        need(
            all(isinstance(q, int) and not isinstance(q, bool) and q >= 2
                for q in self.query_schedule),
            f"query_schedule must hold integers >= 2, got {self.query_schedule}",
        )  # fmt: skip
        need(
            not self.query_schedule or len(self.query_schedule) == self.rounds,
            f"query_schedule has {len(self.query_schedule)} entries for {self.rounds} rounds; "
            "give one entry a round (and rounds to match)",
        )
        need(self.oracle_batch >= 0, f"oracle_batch must be >= 0, got {self.oracle_batch}")
        need(
            self.updates_per_round >= 1,
            f"updates_per_round must be >= 1, got {self.updates_per_round}",
        )
        need(self.ensemble_size >= 2, f"ensemble_size must be >= 2, got {self.ensemble_size}")
        need(self.proxy_hidden >= 1, f"proxy_hidden must be >= 1, got {self.proxy_hidden}")
        need(self.proxy_steps >= 1, f"proxy_steps must be >= 1, got {self.proxy_steps}")
        need(self.proxy_lr > 0, f"proxy_lr must be > 0, got {self.proxy_lr}")
        need(
            self.proxy_weight_decay >= 0,
            f"proxy_weight_decay must be >= 0, got {self.proxy_weight_decay}",
        )
        need(
            self.optimism in OPTIMISM,
            f"unknown optimism {self.optimism!r}; known: {', '.join(OPTIMISM)}",
        )
        need(self.kappa >= 0, f"kappa must be >= 0, got {self.kappa}")

    def queries(self, k: int) -> int:
        """The oracle queries of round ``k`` (0-based)."""
        return self.query_schedule[k] if self.query_schedule else self.queries_per_round

    @property
    def budget(self) -> int:
        return sum(self.queries(k) for k in range(self.rounds))

    @property
    def max_queries(self) -> int:
        return max(self.queries(k) for k in range(self.rounds))

    def schedule_text(self) -> str:
        """'4 rounds x 64' or '1024 + 2048 + 4096 + 8192' (for tables and plots)."""
        if not self.query_schedule:
            return f"{self.rounds} rounds x {self.queries_per_round}"
        return " + ".join(str(q) for q in self.query_schedule)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def bbo_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(BboConfig))
