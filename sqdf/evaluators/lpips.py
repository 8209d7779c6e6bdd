"""LPIPS (Zhang et al., 2018) from the ``lpips`` package: ``lpips.LPIPS(net='alex',
version='0.1')`` called with ``normalize=True`` on images in [0, 1]. Mean LPIPS over the pairs
of a prompt's images is the usual measure of their diversity, and so of the mode collapse that
reward fine-tuning invites.

Weights, each read with weights_only=True:

- the linear layers: the lpips package's own ``weights/v0.1/alex.pth``, inside its wheel;
- the AlexNet trunk: torchvision's ImageNet AlexNet, ``alexnet-owt-7be5be79.pth``. Without a
  file, torchvision's ``AlexNet_Weights.IMAGENET1K_V1`` fetches it once into the torch hub
  cache (:func:`~sqdf.evaluators.third_party.hub_checkpoints`) and reads it from there after.
  A file given instead is a copy of that .pth, or a safetensors file with its ``features.*``
  keys; one that also holds lpips' ``lin0.model.1.weight`` ... ``lin4`` (as the former
  ``sqdf convert-lpips`` wrote them) gives those linear layers too.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sqdf.errors import ConfigError, SqdfError
from sqdf.evaluators.third_party import (
    first_line,
    hub_checkpoints,
    metric_package,
    quietly,
    read_state_dict,
    weights_only_loads,
)
from sqdf.infra.weights import resolve

TRUNK_FILE = "alexnet-owt-7be5be79.pth"
LIN_KEYS = tuple(f"lin{i}.model.1.weight" for i in range(5))
# The smallest side AlexNet's trunk up to relu5 takes: conv1 (k11, s4, p2), then two 3×3
# stride-2 max-pools that each need 3 pixels: 31 -> 7 -> 3 -> 1. The lpips package does not
# check; torch would fail deep inside with a pooling error.
MIN_SIZE = 31


def default_trunk(progress: bool = False) -> dict[str, Tensor]:
    """torchvision's AlexNet weights, fetched into the torch hub cache on first use; ConfigError
    naming the file, its address and the folder when that fails (offline)."""
    from torchvision.models import AlexNet_Weights

    weights = AlexNet_Weights.IMAGENET1K_V1
    try:  # torch.hub says "Downloading ..." on stdout, which carries sqdf eval's JSON
        with contextlib.redirect_stdout(sys.stderr):
            return weights.get_state_dict(progress=progress, check_hash=True, weights_only=True)
    except Exception as err:  # offline: URLError; a damaged cached file: an unpickling error
        raise ConfigError(
            f"LPIPS needs torchvision's AlexNet weights ({TRUNK_FILE}) and could not get them "
            f"({first_line(err)}): download {weights.url} into {hub_checkpoints()}, "
            "or give --lpips FILE"
        ) from None


def _take(state: dict[str, Tensor], wanted: dict[str, torch.Size], source: str) -> dict:
    """``state``'s tensors under the keys of ``wanted``, each of its shape, in float32."""
    for key, shape in wanted.items():
        if key not in state:
            raise ConfigError(f"{source}: missing key {key}")
        if not state[key].is_floating_point() or state[key].shape != shape:
            raise ConfigError(
                f"{source}: {key} should be a float tensor of shape {tuple(shape)}, got "
                f"{state[key].dtype} {tuple(state[key].shape)}"
            )
    return {key: state[key].float() for key in wanted}


def load_lpips(
    weights: str | Path | None = None, device: Any = "cpu", progress: bool = False
) -> Any:
    """The lpips package's LPIPS (AlexNet, v0.1) with its trunk from ``weights`` (a file, or
    None for torchvision's download), in eval mode and frozen."""
    lpips = metric_package("lpips", "LPIPS")
    # pnet_rand: the trunk is loaded below, so lpips does not ask torchvision to download it.
    with weights_only_loads(), quietly():
        model = lpips.LPIPS(pretrained=True, net="alex", version="0.1", pnet_rand=True,
                            verbose=False)  # fmt: skip
    if weights is None:
        state, source = default_trunk(progress), f"torchvision's {TRUNK_FILE}"
    else:
        weights = resolve(str(weights), "--lpips")  # a local file or a Hub reference
        state = read_state_dict(weights, "LPIPS weight file")
        source = f"LPIPS weight file {Path(weights).expanduser()}"
    if not any(key.startswith("features.") for key in state):
        raise ConfigError(f"{source} is not torchvision's AlexNet checkpoint (no features.*)")
    # lpips' five slices keep torchvision's layer indices: its net.slice2.3.weight is features.3.
    trunk = {k: v.shape for k, v in model.net.state_dict().items()}
    named = _take(state, {"features." + k.split(".", 1)[1]: s for k, s in trunk.items()}, source)
    model.net.load_state_dict({k: named["features." + k.split(".", 1)[1]] for k in trunk})
    if any(key in state for key in LIN_KEYS):
        lins = _take(state, {key: model.state_dict()[key].shape for key in LIN_KEYS}, source)
        for i, key in enumerate(LIN_KEYS):
            model.get_submodule(f"lin{i}").load_state_dict({"model.1.weight": lins[key]})
    return model.to(device).eval().requires_grad_(False)


def check_request(weights: str | Path | None, image_side: Callable[[], int]) -> None:
    """The package, the named file if any, and images of ``image_side()`` px large enough."""
    metric_package("lpips", "LPIPS")
    if weights is not None:
        weights = resolve(str(weights), "--lpips")
    if weights is not None and not Path(weights).expanduser().is_file():
        raise ConfigError(f"LPIPS weight file not found: {Path(weights).expanduser()}")
    check_side(image_side())


def check_side(side: int) -> None:
    """ConfigError unless images of ``side`` pixels reach AlexNet's last tapped layer."""
    if side < MIN_SIZE:
        raise ConfigError(
            f"LPIPS (AlexNet) needs images of at least {MIN_SIZE} px a side; these are {side}"
        )


@torch.no_grad()
def mean_pairwise_lpips(model: Any, images: Tensor, batch_size: int = 16) -> float:
    """Mean LPIPS over all pairs i < j of a set of images: the diversity of the set."""
    # images: (N, 3, H, W) in [0, 1]
    if images.ndim != 4 or images.shape[1] != 3:
        raise SqdfError(f"LPIPS expects RGB images (N, 3, H, W), got {tuple(images.shape)}")
    check_side(min(images.shape[-2:]))
    n = images.shape[0]
    if n < 2:
        raise SqdfError(f"mean pairwise LPIPS needs at least 2 images, got {n}")
    device = next(model.parameters()).device
    first, second = torch.triu_indices(n, n, offset=1)
    total = 0.0
    for i, j in zip(first.split(batch_size), second.split(batch_size), strict=True):
        pair = images[i].to(device), images[j].to(device)
        total += float(model(*pair, normalize=True).double().sum())
    return total / first.numel()
