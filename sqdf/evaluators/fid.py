"""FID (Heusel et al., 2017) by torchmetrics' ``FrechetInceptionDistance``: the Fréchet distance
between Gaussians fitted to the 2048-d pool features of torch-fidelity's InceptionV3 (the
TensorFlow FID network, ``pt_inception-2015-12-05``) of two image sets.

sqdf eval compares the fine-tuned images with the reference model's images from the same noise
and prompts: how far fine-tuning moved the distribution, in the features FID is known by. It is
not an FID against real images, and with fewer images than 2048 its covariances are singular, so
it compares runs evaluated alike rather than numbers from papers.

Images are resized to 299 px as TensorFlow's FID did (torchmetrics' ``antialias=False``, which
is torch-fidelity's TF1-compatible bilinear resize) after torchmetrics' 8-bit quantisation.
Weights: ``weights-inception-2015-12-05-6726825d.pth``; without a file torch-fidelity fetches it
from its GitHub release into the torch hub cache, and torch-fidelity's own ``torch.load``
(weights_only=False) is made to read tensors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sqdf.errors import ConfigError
from sqdf.evaluators.third_party import (
    first_line,
    hub_checkpoints,
    metric_package,
    quietly,
    weights_only_loads,
)

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


def check_request(weights: str | Path | None) -> None:
    """Both packages present and, where a file is named, the file."""
    metric_package("torchmetrics", "FID")
    metric_package("torch_fidelity", "FID", "torch-fidelity")
    if weights is not None and not Path(weights).expanduser().is_file():
        raise ConfigError(f"FID Inception weight file not found: {Path(weights).expanduser()}")


def load_fid(weights: str | Path | None = None, device: Any = "cpu") -> Any:
    """torchmetrics' FrechetInceptionDistance on 2048-d features, taking [0, 1] images."""
    check_request(weights)
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    from torchmetrics.image.fid import FrechetInceptionDistance

    path = None if weights is None else str(Path(weights).expanduser())
    try:
        with weights_only_loads(), quietly():
            metric = FrechetInceptionDistance(feature=2048, normalize=True, antialias=False,
                                              feature_extractor_weights_path=path)  # fmt: skip
    except Exception as err:  # offline: URLError; a foreign file: refused or mismatched keys
        where = f"FID Inception weight file {path}" if path else f"torch-fidelity's {WEIGHTS_FILE}"
        raise ConfigError(
            f"FID could not load {where} ({first_line(err)}): download {URL_INCEPTION_V3} into "
            f"{hub_checkpoints()}, or give --fid FILE"
        ) from None
    return metric.to(device)


@torch.no_grad()
def inception_fid(metric: Any, images: Tensor, reference: Tensor, batch_size: int = 16) -> float:
    """FID between two sets of [0, 1] images (at least 2 each)."""
    # images: (N, 3, H, W), reference: (M, 3, H, W)
    metric.reset()
    device = metric.device
    for chunk in reference.split(batch_size):
        metric.update(chunk.clamp(0, 1).to(device), real=True)
    for chunk in images.split(batch_size):
        metric.update(chunk.clamp(0, 1).to(device), real=False)
    return float(metric.compute())
