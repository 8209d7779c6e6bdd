"""DreamSim (Fu et al., 2023) from the ``dreamsim`` package: the perceptual distance
1 - cos(e(x), e(y)) between the model's embeddings of two images. Mean DreamSim over the pairs
of a prompt's images measures their diversity, as LPIPS does, on features that follow human
judgements of layout, pose and content more than texture.

The model is the package's own loader, ``dreamsim(dreamsim_type=...)``, over a folder that holds
its unzipped checkpoint (the backbones' ``*_pretrain.pth[.tar]`` and the ``*_lora`` adapter).
Where the folder lacks it, the loader downloads it from the package's GitHub release
(``dreamsim.config.dreamsim_weights``); the DINO backbones (``ensemble``, ``dino_vitb16``,
``dinov2_vitb14``) also come through torch.hub from facebookresearch's repositories, while
``clip_vitb32`` and ``open_clip_vitb32`` read only the folder. Every torch.load inside reads
tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sqdf.errors import ConfigError, SqdfError
from sqdf.evaluators.third_party import first_line, metric_package, quietly, weights_only_loads

DEFAULT_TYPE = "ensemble"  # the package's default and, in its paper, the closest to people


def default_folder() -> Path:
    """Where sqdf keeps DreamSim's checkpoint unless told: $TORCH_HOME/hub/dreamsim."""
    return Path(torch.hub.get_dir()) / "dreamsim"


def dreamsim_types() -> list[str]:
    """The models the package's loader builds (its patch-feature variants are left out: their
    distance is not the cosine of one embedding)."""
    from dreamsim.config import dreamsim_weights

    return [name for name in dreamsim_weights if not name.endswith("_patch")]


def check_request(folder: str | Path | None, dreamsim_type: str) -> None:
    """The package, a known model type and, where one is named, an existing folder."""
    metric_package("dreamsim", "DreamSim")
    if dreamsim_type not in dreamsim_types():
        raise ConfigError(
            f"unknown DreamSim type {dreamsim_type!r}; known: {', '.join(dreamsim_types())}"
        )
    if folder is not None and not Path(folder).expanduser().is_dir():
        raise ConfigError(f"DreamSim weights folder not found: {Path(folder).expanduser()}")


@dataclass
class DreamSim:
    """The package's model and its own preprocessing (an 8-bit PIL image resized to 224 px)."""

    model: Any
    preprocess: Any
    device: torch.device

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """The model's embeddings of [0, 1] images, through the package's preprocessing."""
        # images: (N, 3, H, W) -> (N, D)
        from torchvision.transforms.functional import to_pil_image

        batch = torch.cat([self.preprocess(to_pil_image(x.clamp(0, 1).float().cpu()))
                           for x in images])  # fmt: skip
        return torch.cat([self.model.embed(c.to(self.device)) for c in batch.split(16)]).cpu()

    def mean_pairwise(self, images: Tensor) -> float:
        """Mean DreamSim distance over all pairs i < j of a set of images; each image is
        embedded once (the package's forward embeds both images of every pair)."""
        n = images.shape[0]
        if n < 2:
            raise SqdfError(f"mean pairwise DreamSim needs at least 2 images, got {n}")
        e = self.embed(images).double()
        i, j = torch.triu_indices(n, n, offset=1)
        return float((1 - F.cosine_similarity(e[i], e[j], dim=-1)).mean())


def load_dreamsim(
    folder: str | Path | None = None, dreamsim_type: str = DEFAULT_TYPE, device: Any = "cpu"
) -> DreamSim:
    """The package's DreamSim of ``dreamsim_type`` from ``folder`` (None: :func:`default_folder`,
    made if missing, where the package downloads what is not there)."""
    check_request(folder, dreamsim_type)
    from dreamsim import dreamsim
    from dreamsim.config import dreamsim_weights

    where = default_folder() if folder is None else Path(folder).expanduser()
    where.mkdir(parents=True, exist_ok=True)
    # The package points torch.hub at its folder for the DINO backbones (torch.hub.set_dir);
    # torch keeps that setting in _hub_dir, None while the folder follows $TORCH_HOME.
    hub = torch.hub._hub_dir
    try:
        with weights_only_loads(), quietly():
            model, preprocess = dreamsim(pretrained=True, device=str(device), cache_dir=str(where),
                                         dreamsim_type=dreamsim_type)  # fmt: skip
    except Exception as err:  # offline: URLError; a damaged folder: whatever its loader raises
        raise ConfigError(
            f"DreamSim {dreamsim_type} could not load from {where} ({first_line(err)}): unzip "
            f"{dreamsim_weights[dreamsim_type]} there, or give --dreamsim FOLDER"
        ) from None
    finally:
        torch.hub._hub_dir = hub
    return DreamSim(model, preprocess, torch.device(device))
