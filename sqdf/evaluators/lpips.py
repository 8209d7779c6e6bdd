"""LPIPS perceptual distance (Zhang et al., 2018), AlexNet variant v0.1, without torchvision.

Mean LPIPS between pairs of samples is the usual measure of how diverse generated images
are, and so of the mode collapse that reward fine-tuning invites. The value equals the
``lpips`` package's ``LPIPS(net='alex', version='0.1')`` (its default ``spatial=False``) called
with ``normalize=True`` on images in [0, 1]:

    d(x0, x1) = sum_l  mean_hw  sum_c w_lc (û_l(x0) - û_l(x1))²,    û = u / (||u||_c + 1e-10)

where u_l are the five ReLU outputs of AlexNet's convolutional trunk, fed the images mapped
to [-1, 1] and then through lpips' fixed ScalingLayer, ||u||_c is the L2 norm over channels
at each position, and w_l are lpips' learned non-negative "lin" weights.

The weights are read from one local safetensors file, made once by ``convert_lpips_weights``
from two public files:

- torchvision's ImageNet AlexNet, ``alexnet-owt-7be5be79.pth``
  (https://download.pytorch.org/models/alexnet-owt-7be5be79.pth); only its ``features.*``
  keys are kept (the classifier plays no part in LPIPS).
- lpips' linear layers, ``lpips/weights/v0.1/alex.pth`` in
  https://github.com/richzhang/PerceptualSimilarity (also inside the ``lpips`` wheel on
  PyPI), with keys ``lin0.model.1.weight`` ... ``lin4.model.1.weight``.

Both are third-party pickles, read with ``weights_only=True`` so that neither can run code.
The trunk below keeps torchvision's layer indices, so its keys load unchanged; torchvision
itself is neither needed nor installed.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sqdf.atomic import atomic_write
from sqdf.errors import ConfigError, SqdfError

# Channels of the five tapped ReLU outputs, and their indices in AlexNet's ``features``.
CHANNELS = (64, 192, 384, 256, 256)
TAPS = (1, 4, 7, 9, 11)
# lpips' ScalingLayer: ImageNet's channel mean and std expressed on the [-1, 1] scale.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# lpips adds this to the channel norm, so an all-zero feature vector stays zero, not NaN.
EPS = 1e-10
# The smallest side the trunk accepts: conv1 (k11, s4, p2) and then two 3×3 stride-2 max-pools,
# each of which needs 3 pixels: 31 -> 7 -> 3 -> 1. torchvision's last pool (features.12) is not
# part of LPIPS, so the 63 pixels it would need are not.
MIN_SIZE = 31


def normalize_channels(feat: Tensor) -> Tensor:
    """Each position's feature vector divided by its L2 norm over channels (plus 1e-10, as
    lpips does), so that LPIPS compares the direction of activations, not their scale."""
    # feat: (B, C, H, W)
    return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)


def layer_distance(unit0: Tensor, unit1: Tensor, lin_weight: Tensor) -> Tensor:
    """One layer's LPIPS term, (B,): the squared difference of channel-normalised features,
    weighted over channels by lpips' bias-free 1×1 "lin" conv, then averaged over positions."""
    # unit0, unit1: (B, C, H, W) from normalize_channels; lin_weight: (1, C, 1, 1)
    return F.conv2d((unit0 - unit1).pow(2), lin_weight).mean(dim=(1, 2, 3))


def _check_images(images: Tensor, name: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise SqdfError(
            f"LPIPS expects RGB images (B, 3, H, W) in [0, 1], got {name} of shape "
            f"{tuple(images.shape)}"
        )
    h, w = images.shape[-2:]
    if min(h, w) < MIN_SIZE:
        raise SqdfError(
            f"LPIPS (AlexNet) needs images of at least {MIN_SIZE}×{MIN_SIZE} pixels, "
            f"got {name} of {h}×{w}"
        )


class _LinLayer(nn.Module):
    """lpips' NetLinLayer: a bias-free 1×1 conv to one channel, stored at ``model.1.weight``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # lpips has Dropout at index 0, a no-op in evaluation. Identity keeps the conv at
        # index 1 (hence the key) without a layer that would make distances random in train mode.
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS v0.1 over AlexNet; its state-dict keys are exactly those of the weight file.

    Build it with ``load_lpips``: a freshly constructed LPIPS has random weights.
    """

    def __init__(self) -> None:
        super().__init__()
        # torchvision's AlexNet.features up to relu5; indices fix the keys features.0/3/6/8/10.
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
        )
        for i, channels in enumerate(CHANNELS):
            self.add_module(f"lin{i}", _LinLayer(channels))
        # Constants, not weights: kept out of the state dict and so out of the file.
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def lin_weights(self) -> list[Tensor]:
        """The five "lin" conv weights, each (1, C_l, 1, 1)."""
        return [self.get_submodule(f"lin{i}").model[1].weight for i in range(len(CHANNELS))]

    def unit_features(self, images: Tensor) -> list[Tensor]:
        """The five tapped AlexNet activations of [0, 1] images, channel-normalised."""
        # images: (B, 3, H, W) in [0, 1] -> [(B, C_l, H_l, W_l)] for l = 0..4
        _check_images(images, "images")
        x = (images.to(self.shift) * 2 - 1 - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                taps.append(normalize_channels(x))
        return taps

    def forward(self, images0: Tensor, images1: Tensor) -> Tensor:
        """LPIPS distance of each pair (images0[b], images1[b]); (B,), 0 for identical images."""
        # images0, images1: (B, 3, H, W) in [0, 1]
        if images0.shape != images1.shape:
            raise SqdfError(
                f"LPIPS compares images of one shape, got {tuple(images0.shape)} and "
                f"{tuple(images1.shape)}"
            )
        _check_images(images0, "images0")
        # One trunk pass over both sets: half the kernel launches of two passes.
        feats = self.unit_features(torch.cat([images0, images1]))
        b = images0.shape[0]
        weights = self.lin_weights()
        terms = [layer_distance(f[:b], f[b:], w) for f, w in zip(feats, weights, strict=True)]
        return torch.stack(terms).sum(dim=0)

    @torch.no_grad()
    def mean_pairwise(self, images: Tensor, batch_size: int = 32) -> float:
        """Mean LPIPS over all pairs i < j of a set of images: the diversity of the set.

        Each image's features are computed once, ``batch_size`` images at a time, and kept
        (about 2.5 MB per 256×256 image in float32); the N(N-1)/2 pairs are then scored
        ``batch_size`` at a time, so memory grows with N, not with the number of pairs.
        """
        # images: (N, 3, H, W) in [0, 1]
        _check_images(images, "images")
        n = images.shape[0]
        if n < 2:
            raise SqdfError(f"mean pairwise LPIPS needs at least 2 images, got {n}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        chunks = [self.unit_features(chunk) for chunk in images.split(batch_size)]
        feats = [torch.cat(layer) for layer in zip(*chunks, strict=True)]
        weights = self.lin_weights()
        first, second = torch.triu_indices(n, n, offset=1, device=feats[0].device)
        total = torch.zeros((), dtype=torch.float64, device=feats[0].device)
        for i, j in zip(first.split(batch_size), second.split(batch_size), strict=True):
            for f, w in zip(feats, weights, strict=True):
                total += layer_distance(f[i], f[j], w).double().sum()
        return float(total) / first.numel()


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of an LPIPS weight file with its shape, trunk first, in layer order."""
    # On the meta device nothing is allocated or initialised: only the shapes are wanted.
    with torch.device("meta"):
        model = LPIPS()
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _check_state(
    state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], source: str
) -> None:
    """ConfigError naming ``source`` and the first key that is missing, of the wrong shape or
    not expected at all; a silently half-loaded model would give plausible wrong distances."""
    for key, shape in expected.items():
        if key not in state:
            raise ConfigError(f"{source}: missing key {key}")
        value = state[key]
        if not value.is_floating_point() or tuple(value.shape) != shape:
            raise ConfigError(
                f"{source}: {key} should be a float tensor of shape {shape}, got "
                f"{value.dtype} {tuple(value.shape)}"
            )
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise ConfigError(f"{source}: unexpected key {unexpected[0]}")


def load_lpips_weights(path: str | Path) -> dict[str, Tensor]:
    """The validated tensors of an LPIPS weight file (safetensors, keys as ``expected_shapes``);
    ConfigError with a one-line reason for a missing, unreadable or incomplete file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"LPIPS weight file not found: {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"LPIPS weight file {path} is not a safetensors file ({err})") from None
    _check_state(tensors, expected_shapes(), f"LPIPS weight file {path}")
    return tensors


def load_lpips(path: str | Path, device: str | torch.device = "cpu") -> LPIPS:
    """LPIPS with the weights of ``path`` in float32, in eval mode and frozen (gradients still
    flow to the images, so it can serve as a loss)."""
    model = LPIPS()
    model.load_state_dict({k: v.float() for k, v in load_lpips_weights(path).items()})
    return model.to(device).eval().requires_grad_(False)


def _first_line(err: BaseException) -> str:
    """A one-line reason from torch.load's error, whose weights_only refusal spans a page."""
    if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err):
        return "it pickles objects other than tensors, which weights_only=True refuses"
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _read_state_dict(path: str | Path, what: str) -> dict[str, Tensor]:
    """A .pth file that must hold a state dict of tensors, read without running its code."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged pickle raises anything from KeyError to EOFError
        raise ConfigError(f"cannot read {path} as {what} ({_first_line(err)})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ConfigError(
            f"{path} is not {what}: expected a state dict of tensors, got {type(state).__name__}"
        )
    return state


def convert_lpips_weights(alexnet_pth: str | Path, lin_pth: str | Path, out: str | Path) -> Path:
    """The two public files (torchvision's ``alexnet-owt-7be5be79.pth`` and lpips'
    ``weights/v0.1/alex.pth``) -> one safetensors file for ``load_lpips``, so that evaluation
    never unpickles third-party files and needs neither torchvision nor lpips installed."""
    expected = expected_shapes()
    trunk = _read_state_dict(alexnet_pth, "torchvision's AlexNet checkpoint")
    lins = _read_state_dict(lin_pth, "lpips' v0.1 alex.pth")
    # torchvision's file also holds the classifier, which LPIPS does not use.
    features = {k: v for k, v in trunk.items() if k.startswith("features.")}
    if not features:
        raise ConfigError(f"{alexnet_pth} is not torchvision's AlexNet checkpoint (no features.*)")
    _check_state(
        features,
        {k: s for k, s in expected.items() if k.startswith("features.")},
        f"{alexnet_pth} (torchvision AlexNet)",
    )
    _check_state(
        lins,
        {k: s for k, s in expected.items() if k.startswith("lin")},
        f"{lin_pth} (lpips v0.1 alex.pth)",
    )
    # clone: save_file refuses tensors that share storage, which a pickle may produce.
    tensors = {k: v.detach().clone().contiguous() for k, v in {**features, **lins}.items()}
    out = Path(out)
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp)))
    load_lpips_weights(out)  # the result must read back as an LPIPS weight file
    return out
