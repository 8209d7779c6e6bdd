"""The shipped digits: 5,000 MNIST images, area-downsampled to the model's resolution."""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

NUM_CLASSES = 10


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    path = resources.files("sqdf.assets") / "data" / "mnist_5k.csv.gz"
    with resources.as_file(path) as p, gzip.open(p, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 1, 28, 28) / 255.0, table[:, -1].astype(np.int64)


def load_digits(size: int = 16) -> tuple[Tensor, Tensor]:
    """(images (N, 1, size, size) in [0, 1], labels (N,)) from the shipped MNIST subset."""
    images, labels = _raw()
    x = torch.from_numpy(images.copy())
    if size != 28:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x, torch.from_numpy(labels.copy())
