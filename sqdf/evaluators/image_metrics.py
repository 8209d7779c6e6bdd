"""The image metrics sqdf eval adds on request, each from the package the field uses: LPIPS and
DreamSim diversity within a prompt's images, and FID between the fine-tuned and the reference
images. Each is asked for as None (not computed), True (its default weights, fetched by its
package into the torch hub cache) or a local path.

:func:`check_request` runs before any model loads, so that a missing package, a missing file or
images too small end the command in one line before anything is sampled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from sqdf.errors import ConfigError
from sqdf.evaluators import dreamsim as ds
from sqdf.evaluators import fid as fd
from sqdf.evaluators import lpips as lp

Choice = str | Path | bool | None


def _path(choice: Choice) -> str | Path | None:
    return None if choice is True else choice  # type: ignore[return-value]


@dataclass(frozen=True)
class ImageMetricRequest:
    lpips: Choice = None
    dreamsim: Choice = None
    dreamsim_type: str | None = None  # None: ds.DEFAULT_TYPE
    fid: Choice = None

    def flags(self) -> dict[str, Choice]:
        """--flag -> what was asked, for the options only sd runs take."""
        return {"--lpips": self.lpips, "--dreamsim": self.dreamsim, "--fid": self.fid}


@dataclass
class ImageMetrics:
    """The loaded metrics: diversity name -> mean pairwise distance of a set of images, the FID
    of two sets, and what each was computed with (eval.json's ``lpips``, ``dreamsim``, ``fid``)."""

    diversity: dict[str, Callable[[Tensor], float]] = field(default_factory=dict)
    fid: Callable[[Tensor, Tensor], float] | None = None
    described: dict[str, str] = field(default_factory=dict)


def check_request(request: ImageMetricRequest, image_side: Callable[[], int]) -> None:
    """Packages, named files and image size (``image_side()``, read only for LPIPS)."""
    if request.lpips:
        lp.check_request(_path(request.lpips), image_side)
    if request.dreamsim_type and not request.dreamsim:
        raise ConfigError("--dreamsim-type picks the model of --dreamsim, which is not given")
    if request.dreamsim:
        ds.check_request(_path(request.dreamsim), request.dreamsim_type or ds.DEFAULT_TYPE)
    if request.fid:
        fd.check_request(_path(request.fid))


def load_image_metrics(
    request: ImageMetricRequest, device: Any = "cpu", progress: bool = False
) -> ImageMetrics:
    out = ImageMetrics()
    default = "default weights"
    if request.lpips:
        model = lp.load_lpips(_path(request.lpips), device, progress)
        out.diversity["lpips"] = lambda images: lp.mean_pairwise_lpips(model, images)
        trunk = _path(request.lpips) or f"torchvision's {lp.TRUNK_FILE} ({default})"
        out.described["lpips"] = f"lpips package, AlexNet v0.1; trunk: {trunk}"
    if request.dreamsim:
        kind = request.dreamsim_type or ds.DEFAULT_TYPE
        sim = ds.load_dreamsim(_path(request.dreamsim), kind, device)
        out.diversity["dreamsim"] = sim.mean_pairwise
        folder = _path(request.dreamsim) or f"{ds.default_folder()} ({default})"
        out.described["dreamsim"] = f"dreamsim package, {kind}; from {folder}"
    if request.fid:
        metric = fd.load_fid(_path(request.fid), device)
        out.fid = lambda images, reference: fd.inception_fid(metric, images, reference)
        weights = _path(request.fid) or f"torch-fidelity's {fd.WEIGHTS_FILE} ({default})"
        out.described["fid"] = (
            "torchmetrics FrechetInceptionDistance, torch-fidelity InceptionV3 2048-d pool "
            f"features ({weights}): the fine-tuned images against the reference model's images "
            "from the same noise and prompts"
        )
    return out
