"""An independent judge of generated digits: the MNIST CNN shipped in ``digit-recognizer-py``.

Over-optimisation of a reward shows up as a gap between the reward and a model the reward
never saw. This one was trained by someone else, on full-size MNIST, and is only read here:
its weights are loaded into our own copy of its architecture, so that loading it reads one
weight file (with ``weights_only=True``) and runs none of the package's code.
"""

from __future__ import annotations

import importlib.util
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sqdf.assets.digits_data import NUM_CLASSES, load_digits
from sqdf.errors import SqdfError
from sqdf.evaluators.feature_stats import frechet_distance, mean_pairwise_distance, vendi_score

MODEL_PACKAGE = "digit_recognizer"
INSTALL_COMMAND = "pip install --no-deps digit-recognizer-py==0.1.0"
WEIGHTS_FILE = Path("models") / "handwriting_model.pth"
INPUT_SIZE = 28
# The MNIST pixel mean and std the CNN was trained with.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CHUNK = 512


class DigitCNN(nn.Module):
    """Three conv-ReLU-maxpool blocks and a two-layer head; 28×28 normalised input."""

    def __init__(self) -> None:
        super().__init__()
        # Layer indices must match the shipped state dict: conv_layers.0/3/6, fc_layers.0/2.
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        self.fc_layers = nn.Sequential(
            nn.Linear(128 * 3 * 3, 256),
            nn.ReLU(),
            nn.Linear(256, NUM_CLASSES),
        )

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (after the first linear layer's ReLU); (B, 256)."""
        # x: (B, 1, 28, 28)
        return self.fc_layers[:2](self.conv_layers(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits; (B, 10)."""
        return self.fc_layers[2](self.features(x))


def weights_path() -> Path:
    """The CNN's weight file inside the installed package, found without importing it."""
    # find_spec locates a top-level package without running its __init__ (module-level code
    # of a third party, which loading a weight file has no need to run).
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SqdfError(
            f"the digit evaluator needs the package digit-recognizer-py; run: {INSTALL_COMMAND}"
        )
    path = Path(spec.submodule_search_locations[0]) / WEIGHTS_FILE
    if not path.is_file():
        raise SqdfError(f"digit evaluator weights missing at {path}; reinstall: {INSTALL_COMMAND}")
    return path


def load_digit_cnn(device: str | torch.device = "cpu") -> DigitCNN:
    """DigitCNN with the shipped weights, in eval mode and frozen."""
    path = weights_path()
    try:
        # weights_only refuses arbitrary pickled code: the file is third-party.
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = DigitCNN()
        model.load_state_dict(state)
    except (RuntimeError, TypeError, pickle.UnpicklingError, EOFError) as err:
        raise SqdfError(
            f"cannot load digit evaluator weights {path} ({err}); reinstall: {INSTALL_COMMAND}"
        ) from None
    return model.to(device).eval().requires_grad_(False)


def _per_class_mean(feats: Tensor, labels: Tensor, statistic: Callable[[Tensor], float]) -> float:
    """Mean of ``statistic`` over the classes with at least two samples; NaN if none."""
    values = [
        statistic(feats[labels == c]) for c in labels.unique().tolist() if (labels == c).sum() >= 2
    ]
    return sum(values) / len(values) if values else float("nan")


class DigitEvaluator:
    """Agreement, confidence, Fréchet distance and diversity of digit images under DigitCNN."""

    def __init__(self, model: DigitCNN, device: str | torch.device = "cpu") -> None:
        self.model = model
        self.device = torch.device(device)
        # Real digits per resolution: (logits, features, labels), computed once.
        self._real: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    @classmethod
    def load(cls, device: str | torch.device = "cpu") -> DigitEvaluator:
        """The evaluator with the shipped weights; SqdfError if the package is missing."""
        return cls(load_digit_cnn(device), device)

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        """[0, 1] images (B, 1, H, W) -> the CNN's input: 28×28, MNIST-normalised.

        Differentiable: bilinear resizing, no clamping.
        """
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be (B, 1, H, W), got shape {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            size = (INPUT_SIZE, INPUT_SIZE)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return (x - MNIST_MEAN) / MNIST_STD

    @torch.no_grad()
    def _logits_and_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        # images: (N, 1, H, W) -> logits (N, 10), features (N, 256), on the CPU
        logits, feats = [], []
        for chunk in images.split(CHUNK):
            h = self.model.features(self.prepare(chunk.to(self.device)))
            feats.append(h.cpu())
            logits.append(self.model.fc_layers[2](h).cpu())
        return torch.cat(logits), torch.cat(feats)

    def logits(self, images: Tensor) -> Tensor:
        """Class logits (N, 10) of [0, 1] images (N, 1, H, W), on the CPU."""
        return self._logits_and_features(images)[0]

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features (N, 256) of [0, 1] images (N, 1, H, W), on the CPU."""
        return self._logits_and_features(images)[1]

    def _real_digits(self, size: int) -> tuple[Tensor, Tensor, Tensor]:
        if size not in self._real:
            images, labels = load_digits(size=size)
            self._real[size] = (*self._logits_and_features(images), labels)
        return self._real[size]

    def real_features(self) -> Tensor:
        """Features (5000, 256) of the shipped real digits at 16×16: the Fréchet reference."""
        return self._real_digits(16)[1]

    def metrics(
        self, images: Tensor, labels: Tensor, reference_features: Tensor | None = None
    ) -> dict[str, float]:
        """Metrics of images generated for ``labels``.

        agreement: fraction classified as the requested label; confidence: mean max softmax
        probability; frechet: Fréchet distance of the features to ``reference_features``
        (default: the real 16×16 digits); diversity / vendi: within-class mean pairwise
        feature distance / Vendi score, averaged over classes with >= 2 images.
        """
        # images: (N, 1, H, W) in [0, 1]; labels: (N,)
        logits, feats = self._logits_and_features(images)
        if reference_features is None:
            reference_features = self.real_features()
        frechet = frechet_distance(feats, reference_features)
        return _summarise(logits, feats, labels.cpu(), frechet)

    def real_digit_metrics(self, size: int = 16) -> dict[str, float]:
        """The same metrics for the shipped real digits: the yardstick for generated ones.

        The Fréchet distance is of the even-indexed half against the odd-indexed half: what two
        independent sets of 2,500 real digits score. It is biased upwards for fewer samples,
        and Vendi grows with the samples per class (500 here); compare at similar counts.
        """
        logits, feats, labels = self._real_digits(size)
        return _summarise(logits, feats, labels, frechet_distance(feats[0::2], feats[1::2]))


def _summarise(logits: Tensor, feats: Tensor, labels: Tensor, frechet: float) -> dict[str, float]:
    """The metrics dict; the Fréchet distance comes in, as its reference differs by caller."""
    # logits: (N, 10), feats: (N, 256), labels: (N,)
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be ({logits.shape[0]},), got {tuple(labels.shape)}")
    probs = logits.softmax(dim=-1)
    return {
        "agreement": float((logits.argmax(dim=-1) == labels).float().mean()),
        "confidence": float(probs.max(dim=-1).values.mean()),
        "frechet": frechet,
        "diversity": _per_class_mean(feats, labels, mean_pairwise_distance),
        "vendi": _per_class_mean(feats, labels, vendi_score),
    }
