"""What every metric from another package needs: the package itself (or one line naming the pip
extra), its weights read without running code, and a one-line reason when they cannot be had.

The packages load their weights themselves, some with ``torch.load`` and ``weights_only=False``
(torch-fidelity) or without the argument (lpips); :func:`weights_only_loads` makes every such
call inside it read tensors only, so a file holding anything else is refused, never run.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file
from torch import Tensor

from sqdf.errors import ConfigError

METRICS_EXTRA = "pip install 'sqdf[metrics]'"


def metric_package(module: str, metric: str, pip_name: str | None = None) -> ModuleType:
    """``module`` imported, else ConfigError naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"{metric} needs the {pip_name or module} package: {METRICS_EXTRA}"
        ) from None


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside reads tensors only, whatever weights_only its caller passes
    (torch's documented TORCH_FORCE_WEIGHTS_ONLY_LOAD switch)."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                                   "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}  # fmt: skip
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


@contextlib.contextmanager
def quietly() -> Iterator[None]:
    """The packages' own prints ("Using cached ...") and deprecation warnings kept off stdout,
    which carries sqdf eval's JSON."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def first_line(err: BaseException) -> str:
    """A one-line reason from an exception whose message may span a page (torch.load's
    weights_only refusal does)."""
    if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err):
        return "it pickles objects other than tensors, which weights_only=True refuses"
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def read_state_dict(path: str | Path, what: str) -> dict[str, Tensor]:
    """A state dict of tensors from a safetensors file or a torch pickle (read with
    weights_only=True); ConfigError naming ``what`` and the file otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged pickle raises anything from KeyError to EOFError
        raise ConfigError(f"cannot read {path} as {what} ({first_line(err)})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ConfigError(
            f"{path} is not {what}: expected a state dict of tensors, got {type(state).__name__}"
        )
    return state


def hub_checkpoints() -> Path:
    """Where torch.hub (and so torchvision and torch-fidelity) keeps downloaded weights:
    $TORCH_HOME/hub/checkpoints, by default ~/.cache/torch/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"
