"""A user's own reward, named on the command line as ``module:function``.

The module is imported only because the user named it. The function gets the task's
images (digits: (B, 1, H, W) in [0, 1]; gmm2d: points (B, 2)) and the conditions (B,),
plus any reward parameters as keyword arguments, and returns one value per sample.
The parameter ``differentiable=false`` (not passed on) declares that its value carries no
gradient to the images, so that only the methods that need none take it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sqdf.errors import ConfigError, SqdfError


def _module_and_function(spec: str, what: str) -> tuple[str, str]:
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ConfigError(f"{what} must be 'module:function', got {spec!r}")
    return module_name, func_name


def check_findable(spec: str, what: str) -> None:
    """A dry run's check of a ``module:function`` the run will import: the module is found
    on the path without running it (its parent packages are imported), so a misspelt name
    fails the plan as it would fail the run. The function's name is left to the run."""
    module_name, _ = _module_and_function(spec, what)
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as err:  # a parent package missing or broken
        found, reason = None, f": {err}"
    else:
        reason = ""
    if found is None:
        raise ConfigError(
            f"cannot import module {module_name!r} for {what.split()[-1]} {spec!r}: no module "
            f"of that name on the path{reason} (the run imports from sys.path: PYTHONPATH, or "
            "the current folder under python -m sqdf.cli)"
        )


def import_function(spec: str, what: str) -> Callable[..., Any]:
    """The function a user named as ``module:function`` (a reward, an oracle); a bad name
    is one ConfigError naming it."""
    module_name, func_name = _module_and_function(spec, what)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"cannot import module {module_name!r} for {what.split()[-1]} {spec!r}: {err}"
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"module {module_name!r} has no function {func_name!r}")
    return func


class CustomReward:
    domain = "any"

    def __init__(self, spec: str, differentiable: bool = True, **params: Any):
        if not isinstance(differentiable, bool):
            raise ConfigError(
                f"reward {spec!r}: differentiable must be true or false, got {differentiable!r}"
            )
        func = import_function(spec, "custom reward")
        self.spec = spec
        self.differentiable = differentiable
        self.params = params
        self._func: Callable[..., Tensor] = func

    def __call__(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        value = self._func(x, cond, **self.params)
        if not isinstance(value, Tensor) or value.shape != (x.shape[0],):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise SqdfError(
                f"reward {self.spec!r} must return a tensor of shape ({x.shape[0]},), got {shape}"
            )
        return value.to(torch.get_default_dtype()) if not value.is_floating_point() else value
