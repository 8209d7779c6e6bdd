"""Settings dataclasses from plain values (task, reward, method and BBO parameters), with
errors that name the bad key and the nearest known one."""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

from sqdf.errors import ConfigError


def suggest(name: str, known: set[str] | list[str]) -> str:
    """'; did you mean 'x'?' for the nearest known name, or ''."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_finite(value: Any, name: str) -> None:
    """Refuse NaN and infinity in ``value`` (a number, or a list or table of them): no
    setting of ours means anything by them, and one would reach the loss unnoticed."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, f"{name}.{key}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_finite(item, name)


def build_settings(cls: type, values: dict[str, Any], what: str) -> Any:
    """The settings dataclass ``cls`` of ``what`` (e.g. "reward 'linear'") from plain values;
    an unknown key or a bad value is a ConfigError that names it."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown parameter {unknown[0]!r} for {what}; "
            f"known: {', '.join(sorted(known)) or 'none'}{suggest(unknown[0], known)}"
        )
    for key, value in values.items():
        check_finite(value, f"{what}: {key}")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what}: {err}") from None
