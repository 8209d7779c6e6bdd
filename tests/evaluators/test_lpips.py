"""LPIPS (AlexNet, v0.1) against a reference written here from the paper's definition, a
hand-computed layer term, and the converter's round trip from the two public file layouts."""

import collections
import fractions
import itertools
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sqdf.errors import ConfigError, SqdfError
from sqdf.evaluators.lpips import (
    LPIPS,
    convert_lpips_weights,
    layer_distance,
    load_lpips,
    load_lpips_weights,
    normalize_channels,
)

# torchvision's AlexNet.features: (index, out, in, kernel, stride, padding) of each conv.
CONVS = [(0, 64, 3, 11, 4, 2), (3, 192, 64, 5, 1, 2), (6, 384, 192, 3, 1, 1)]
CONVS += [(8, 256, 384, 3, 1, 1), (10, 256, 256, 3, 1, 1)]
LIN_CHANNELS = [64, 192, 384, 256, 256]
SHIFT = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
SCALE = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)


def _random_alexnet(seed: int) -> dict[str, torch.Tensor]:
    """A torchvision-layout AlexNet state dict with random weights, classifier included."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, out, inp, k, _, _ in CONVS:
        # He-scaled weights keep activations of order one through the five layers, as in a
        # trained net; unscaled ones would shrink every layer's term towards 0.
        std = math.sqrt(2.0 / (inp * k * k))
        state[f"features.{i}.weight"] = torch.randn(out, inp, k, k, generator=g) * std
        state[f"features.{i}.bias"] = 0.1 * torch.randn(out, generator=g)
    # The real classifier (4096 × 9216, ...) is dropped by the converter; small stand-ins
    # under its key names test that without writing 200 MB.
    state["classifier.1.weight"] = torch.randn(16, 32, generator=g)
    state["classifier.1.bias"] = torch.randn(16, generator=g)
    state["classifier.6.weight"] = torch.randn(10, 16, generator=g)
    return state


def _random_lins(seed: int) -> dict[str, torch.Tensor]:
    """lpips' alex.pth layout; non-negative, as lpips keeps its trained weights."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
        for i, c in enumerate(LIN_CHANNELS)
    }


def reference_lpips(state: dict[str, torch.Tensor], x0: torch.Tensor, x1: torch.Tensor):
    """LPIPS v0.1 in float64, step by step from the state dict; (B,)."""
    s = {k: v.double() for k, v in state.items()}

    def taps(x: torch.Tensor) -> list[torch.Tensor]:
        x = (2 * x.double() - 1 - SHIFT) / SCALE
        out = []
        for i, _, _, _, stride, padding in CONVS:
            if i in (3, 6):  # the two max-pools sit before conv 3 and conv 6
                x = F.max_pool2d(x, kernel_size=3, stride=2)
            w, b = s[f"features.{i}.weight"], s[f"features.{i}.bias"]
            x = F.relu(F.conv2d(x, w, b, stride=stride, padding=padding))
            out.append(x)
        return out

    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    for layer, (a, b) in enumerate(zip(taps(x0), taps(x1), strict=True)):
        a = a / (torch.linalg.vector_norm(a, dim=1, keepdim=True) + 1e-10)
        b = b / (torch.linalg.vector_norm(b, dim=1, keepdim=True) + 1e-10)
        weighted = F.conv2d((a - b) ** 2, s[f"lin{layer}.model.1.weight"])
        total += weighted.mean(dim=(1, 2, 3))
    return total


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    """The two public files' layouts, written with torch.save: AlexNet and lpips' lins."""
    root = tmp_path_factory.mktemp("lpips_sources")
    torch.save(collections.OrderedDict(_random_alexnet(seed=0)), root / "alexnet.pth")
    torch.save(collections.OrderedDict(_random_lins(seed=1)), root / "alex.pth")
    return root / "alexnet.pth", root / "alex.pth"


@pytest.fixture(scope="module")
def weights(sources, tmp_path_factory) -> Path:
    return convert_lpips_weights(*sources, tmp_path_factory.mktemp("lpips") / "lpips.safetensors")


@pytest.fixture(scope="module")
def model(weights) -> LPIPS:
    return load_lpips(weights)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    trunk = {k: v for k, v in _random_alexnet(seed=0).items() if k.startswith("features.")}
    return {**trunk, **_random_lins(seed=1)}


def _without(state: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k != key}


def _one_line_naming(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


# The distance


def test_distance_equals_the_step_by_step_reference(model, state):
    x0, x1 = _images(3, 64, seed=2), _images(3, 64, seed=3)
    expected = reference_lpips(state, x0, x1)
    assert torch.allclose(model(x0, x1).double(), expected, rtol=1e-5, atol=0)


def test_distance_of_nearby_images_equals_the_reference(model, state):
    x0 = _images(2, 70, seed=4)
    x1 = (x0 + 0.02 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    expected = reference_lpips(state, x0, x1)
    distance = model(x0, x1).double()
    assert torch.allclose(distance, expected, rtol=1e-4, atol=0)
    # Small noise must give a smaller distance than unrelated images.
    assert distance.max() < reference_lpips(state, x0, _images(2, 70, seed=6)).min()


def test_distance_of_an_image_to_itself_is_zero_and_to_another_is_not(model):
    x, y = _images(4, 64, seed=7), _images(4, 64, seed=8)
    assert model(x, x).abs().max() < 1e-9
    assert (model(x, y) > 1e-3).all()


def test_distance_is_symmetric(model):
    x, y = _images(3, 64, seed=9), _images(3, 64, seed=10)
    assert torch.allclose(model(x, y), model(y, x), rtol=1e-6, atol=0)


def test_one_layer_term_by_hand():
    # Two positions, two channels. Position 0: [3, 4] -> [0.6, 0.8] against [1, 0]; squared
    # difference [0.16, 0.64], weighted by [1, 2]: 1.44. Position 1: [0, 5] and [0, 2] point
    # the same way, so 0 despite their different lengths. Spatial mean: 0.72.
    f0 = torch.tensor([[3.0, 0.0], [4.0, 5.0]], dtype=torch.float64).view(1, 2, 1, 2)
    f1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64).view(1, 2, 1, 2)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 2, 1, 1)
    d = layer_distance(normalize_channels(f0), normalize_channels(f1), w)
    assert d.shape == (1,)
    assert d.item() == pytest.approx(0.72, rel=1e-9)


def test_a_dead_feature_vector_counts_as_zero_not_nan():
    # All-zero ReLU outputs: lpips' 1e-10 keeps 0 / 0 away; against [0.6, 0.8] with
    # weights [1, 2] the term is 0.36 + 2 * 0.64 = 1.64.
    zero = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    f1 = torch.tensor([3.0, 4.0], dtype=torch.float64).view(1, 2, 1, 1)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 2, 1, 1)
    d = layer_distance(normalize_channels(zero), normalize_channels(f1), w)
    assert d.item() == pytest.approx(1.64, rel=1e-9)


def test_gradients_reach_the_images_but_not_the_weights(model):
    x = _images(2, 64, seed=11).requires_grad_(True)
    model(x, _images(2, 64, seed=12)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


def test_smallest_accepted_size_is_the_smallest_the_network_can_take(model, state):
    # 31 px reach relu5 as 1×1 maps; at 30 the second max-pool gets 2×2, which torch refuses.
    ok = _images(1, 31, seed=13), _images(1, 31, seed=14)
    assert torch.allclose(model(*ok).double(), reference_lpips(state, *ok), rtol=1e-5)
    small = _images(1, 30, seed=15)
    with pytest.raises(RuntimeError):
        reference_lpips(state, small, small)
    tall = torch.rand(1, 3, 64, 30)
    with pytest.raises(SqdfError) as err:
        model(tall, tall)
    _one_line_naming(err, "64×30", "31")
    with pytest.raises(SqdfError, match="30×64"):
        model.mean_pairwise(torch.rand(3, 3, 30, 64))


def test_images_of_different_shapes_or_not_rgb_are_refused(model):
    with pytest.raises(SqdfError, match="one shape"):
        model(_images(2, 64, seed=0), _images(3, 64, seed=0))
    grey = torch.rand(2, 1, 64, 64)
    with pytest.raises(SqdfError, match=re.escape("(2, 1, 64, 64)")):
        model(grey, grey)


# Mean pairwise distance


def test_mean_pairwise_equals_the_mean_over_an_explicit_loop_of_pairs(model, state):
    x = _images(5, 64, seed=16)
    pairs = list(itertools.combinations(range(5), 2))
    loop = [reference_lpips(state, x[i : i + 1], x[j : j + 1]).item() for i, j in pairs]
    expected = sum(loop) / len(loop)
    # Batches of 3 split both the 5 images and the 10 pairs unevenly.
    for batch_size in (1, 3, 64):
        assert model.mean_pairwise(x, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)


def test_mean_pairwise_of_copies_is_zero_and_needs_two_images(model):
    x = _images(1, 64, seed=17).expand(4, -1, -1, -1)
    assert model.mean_pairwise(x) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(SqdfError, match="at least 2 images"):
        model.mean_pairwise(x[:1])


# The weight file and the converter


def test_converter_keeps_the_trunk_and_lins_and_drops_the_classifier(weights, state):
    tensors = load_lpips_weights(weights)
    expected_keys = [f"features.{i}.{p}" for i, *_ in CONVS for p in ("weight", "bias")]
    expected_keys += [f"lin{i}.model.1.weight" for i in range(5)]
    assert sorted(tensors) == sorted(expected_keys)
    for key in expected_keys:
        assert torch.equal(tensors[key], state[key]), key


def test_weight_file_missing_a_key_is_a_config_error_naming_it(state, tmp_path):
    path = tmp_path / "lpips.safetensors"
    save_file(_without(state, "features.6.bias"), str(path))
    with pytest.raises(ConfigError) as err:
        load_lpips(path)
    _one_line_naming(err, str(path), "missing key features.6.bias")


def test_weight_file_with_a_wrong_shape_is_a_config_error_naming_the_key(state, tmp_path):
    path = tmp_path / "lpips.safetensors"
    save_file({**state, "lin2.model.1.weight": torch.rand(1, 383, 1, 1)}, str(path))
    with pytest.raises(ConfigError) as err:
        load_lpips(path)
    _one_line_naming(err, str(path), "lin2.model.1.weight", "(1, 384, 1, 1)", "(1, 383, 1, 1)")


def test_weight_file_with_an_extra_key_is_refused(state, tmp_path):
    path = tmp_path / "lpips.safetensors"
    save_file({**state, "classifier.1.weight": torch.rand(2, 2)}, str(path))
    with pytest.raises(ConfigError, match="unexpected key classifier.1.weight"):
        load_lpips(path)


def test_missing_or_unreadable_weight_file_is_a_config_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_lpips(missing)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError) as err:
        load_lpips(junk)
    _one_line_naming(err, str(junk), "not a safetensors file")


def test_converter_refuses_a_file_that_is_not_a_state_dict(sources, tmp_path):
    alexnet, lins = sources
    out = tmp_path / "lpips.safetensors"
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], not_a_dict)
    with pytest.raises(ConfigError) as err:
        convert_lpips_weights(not_a_dict, lins, out)
    _one_line_naming(err, str(not_a_dict), "not torchvision's AlexNet checkpoint", "list")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"hello world")
    with pytest.raises(ConfigError) as err:
        convert_lpips_weights(alexnet, junk, out)
    _one_line_naming(err, str(junk), "cannot read")
    assert not out.exists()


def test_converter_reads_pickles_only_as_weights(sources, tmp_path):
    # A pickled object beyond tensors (here a Fraction) must be refused, never constructed.
    pickled = tmp_path / "object.pth"
    torch.save({"lin0.model.1.weight": fractions.Fraction(1, 3)}, pickled)
    with pytest.raises(ConfigError) as err:
        convert_lpips_weights(sources[0], pickled, tmp_path / "out.safetensors")
    _one_line_naming(err, str(pickled), "weights_only")


def test_converter_names_the_file_and_key_that_is_missing_or_misshapen(sources, tmp_path):
    alexnet, _ = sources
    out = tmp_path / "lpips.safetensors"
    lins = _random_lins(seed=1)
    short = tmp_path / "short.pth"
    torch.save(_without(lins, "lin3.model.1.weight"), short)
    with pytest.raises(ConfigError) as err:
        convert_lpips_weights(alexnet, short, out)
    _one_line_naming(err, str(short), "missing key lin3.model.1.weight")
    # lpips' vgg.pth has the same key names with VGG's channels: 64, 128, 256, 512, 512.
    vgg = tmp_path / "vgg.pth"
    vgg_channels = [64, 128, 256, 512, 512]
    torch.save(
        {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(vgg_channels)}, vgg
    )
    with pytest.raises(ConfigError) as err:
        convert_lpips_weights(alexnet, vgg, out)
    _one_line_naming(err, str(vgg), "lin1.model.1.weight", "(1, 192, 1, 1)")
    assert not out.exists()


def test_converter_with_its_two_files_swapped_says_which_file_is_wrong(sources, tmp_path):
    alexnet, lins = sources
    with pytest.raises(ConfigError) as err:
        convert_lpips_weights(lins, alexnet, tmp_path / "lpips.safetensors")
    _one_line_naming(err, str(lins), "no features.*")
