"""The oracle: the expensive, non-differentiable true reward of online black-box optimisation.

It takes a batch of samples (as the user sees them: points for gmm2d, [0, 1] pixels for
digits) and their conditions, and gives back plain floats, nothing else: no tensor with a
graph, no model to look into. Every sample sent is a query; ``Oracle`` counts them and never
sends more than its budget. A call that raises, or values that are NaN/inf or of the wrong
number, is an ``OracleError``, or, when the user allows it, those samples are excluded (and
counted as queries spent). A call that failed and stopped the run got no answer, so a resumed
run sends its samples again: the persisted budget counts answered (or excluded) queries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sqdf.errors import SqdfError
from sqdf.rewards.custom import import_function

# f(samples, cond) -> one value per sample, any sequence of numbers
OracleFn = Callable[[Tensor, Tensor], Any]


class OracleError(SqdfError):
    """The oracle failed or answered badly, and excluding the samples was not allowed."""


@dataclass
class OracleReply:
    values: Tensor  # (n,) float64; NaN where excluded
    ok: Tensor  # (n,) bool: a finite value came back for that sample
    problem: str  # what went wrong ("" when nothing did)


class Oracle:
    """A black box with a query budget. ``used`` counts queries (samples sent), ``calls``
    the calls made, including those that failed: a paid query stays paid."""

    def __init__(
        self, name: str, fn: OracleFn, budget: int, *, drop_bad: bool = False, used: int = 0
    ):
        self.name = name
        self.fn = fn
        self.budget = budget
        self.drop_bad = drop_bad
        self.used = used
        self.calls = 0

    @property
    def left(self) -> int:
        return self.budget - self.used

    def query(self, samples: Tensor, cond: Tensor) -> OracleReply:
        """Send ``samples`` (n, ...) with conditions (n,); n queries are spent whatever comes
        back."""
        n = samples.shape[0]
        if n > self.left:  # a bug of the caller, never of the user: refuse before paying
            raise RuntimeError(f"{n} queries asked for with {self.left} of {self.budget} left")
        self.used += n
        self.calls += 1
        try:
            with torch.no_grad():
                raw = self.fn(samples.detach(), cond.detach())
            values, problem = _as_floats(raw, n), ""
        except _BadReply as err:
            values, problem = None, str(err)
        except Exception as err:  # any failure of the user's function is a reply, not a crash
            values, problem = None, f"raised {type(err).__name__}: {err}"
        if values is None:
            values = torch.full((n,), float("nan"), dtype=torch.float64)
        ok = torch.isfinite(values)
        if not problem and not bool(ok.all()):
            problem = f"returned {int((~ok).sum())} non-finite value(s) of {n}"
        if problem:
            problem = f"oracle {self.name!r} {problem}"
            if not self.drop_bad:
                raise OracleError(problem)
        return OracleReply(values.masked_fill(~ok, float("nan")), ok, problem)


class _BadReply(Exception):
    pass


def _as_floats(raw: Any, n: int) -> Tensor:
    """A reply as n float64 values; _BadReply says what was wrong with it."""
    if isinstance(raw, Tensor):
        raw = raw.detach().cpu().double().numpy()
    try:
        arr = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise _BadReply(f"returned {type(raw).__name__}, not numbers") from None
    if arr.shape != (n,):
        raise _BadReply(f"returned shape {tuple(arr.shape)} for {n} samples; expected ({n},)")
    return torch.from_numpy(arr.copy())


def task_oracle(task: Any, reward_name: str) -> OracleFn:
    """The task's own reward as an oracle. Its reward model is captured now, so a proxy put in
    its place for fine-tuning never answers a query; only floats leave."""
    reward_model = task.reward_model

    def oracle(samples: Tensor, cond: Tensor) -> list[float]:
        given = task.reward_conditions(cond.to(task.device))
        return reward_model(samples.to(task.device), given).float().cpu().tolist()

    oracle.__name__ = f"task reward {reward_name}"
    return oracle


def user_oracle(
    spec: str, params: dict[str, Any], conditions: Callable[[Tensor], Any] = lambda c: c
) -> OracleFn:
    """``module:function`` called as ``function(samples, conditions(cond), **params)``: the
    conditions as the task's rewards see them (class indices; prompt strings for sd)."""
    func = import_function(spec, "oracle")
    return lambda samples, cond: func(samples, conditions(cond), **params)
