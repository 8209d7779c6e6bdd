"""LPIPS from the lpips package (AlexNet, v0.1) against a reference written here from the paper's
definition, with the package's own linear layers and random AlexNet trunks in torchvision's
layout; the weight sources and their one-line refusals.

Before the package replaced sqdf's hand-written LPIPS, the two were run side by side with the
same weights on these tests' images (64, 70, 31 and 256 px): they differed by at most 1.5e-7
relative, float32 round-off. The reference below stands in for the hand-written one since."""

import fractions
import itertools
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sqdf.errors import ConfigError, SqdfError
from sqdf.evaluators.lpips import TRUNK_FILE, load_lpips, mean_pairwise_lpips
from tests.evaluators.metric_weights import (
    offline,
    package_lins,
    random_alexnet,
    reference_lpips,
)


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _one_line_naming(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


@pytest.fixture(scope="module")
def alexnet_pth(tmp_path_factory) -> Path:
    """torchvision's alexnet-owt-7be5be79.pth layout (classifier included), random weights."""
    path = tmp_path_factory.mktemp("lpips") / TRUNK_FILE
    torch.save(random_alexnet(seed=0), path)
    return path


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """What the distance should be computed with: that trunk and the package's linear layers."""
    return {**random_alexnet(seed=0), **package_lins()}


@pytest.fixture(scope="module")
def model(alexnet_pth):
    with offline():
        return load_lpips(alexnet_pth)


def _distance(model, x0, x1) -> torch.Tensor:
    with torch.no_grad():
        return model(x0, x1, normalize=True).flatten().double()


def test_distance_equals_the_definition(model, state):
    x0, x1 = _images(3, 64, seed=2), _images(3, 64, seed=3)
    assert torch.allclose(_distance(model, x0, x1), reference_lpips(state, x0, x1), rtol=1e-5)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_distance_of_nearby_images_equals_the_definition(model, state):
    x0 = _images(2, 70, seed=4)
    x1 = (x0 + 0.02 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    distance = _distance(model, x0, x1)
    assert torch.allclose(distance, reference_lpips(state, x0, x1), rtol=1e-4)
    # Small noise must give a smaller distance than unrelated images.
    assert distance.max() < reference_lpips(state, x0, _images(2, 70, seed=6)).min()


def test_mean_pairwise_equals_the_mean_over_an_explicit_loop_of_pairs(model, state):
    x = _images(5, 64, seed=16)
    pairs = list(itertools.combinations(range(5), 2))
    loop = [reference_lpips(state, x[i : i + 1], x[j : j + 1]).item() for i, j in pairs]
    expected = sum(loop) / len(loop)
    # Batches of 3 split the 10 pairs unevenly.
    for batch_size in (1, 3, 64):
        assert mean_pairwise_lpips(model, x, batch_size) == pytest.approx(expected, rel=1e-5)


def test_mean_pairwise_of_copies_is_zero_and_needs_two_images(model):
    x = _images(1, 64, seed=17).expand(4, -1, -1, -1)
    assert mean_pairwise_lpips(model, x) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(SqdfError, match="at least 2 images"):
        mean_pairwise_lpips(model, x[:1])


def test_smallest_accepted_size_is_the_smallest_the_network_can_take(model, state):
    # 31 px reach relu5 as 1×1 maps; at 30 the second max-pool gets 2×2, which torch refuses.
    ok = _images(1, 31, seed=13), _images(1, 31, seed=14)
    assert torch.allclose(_distance(model, *ok), reference_lpips(state, *ok), rtol=1e-5)
    small = _images(2, 30, seed=15)
    with pytest.raises(RuntimeError):
        reference_lpips(state, small, small)
    with pytest.raises(ConfigError) as err:
        mean_pairwise_lpips(model, torch.rand(3, 3, 64, 30))
    _one_line_naming(err, "31", "30")
    with pytest.raises(SqdfError, match=re.escape("(2, 1, 64, 64)")):
        mean_pairwise_lpips(model, torch.rand(2, 1, 64, 64))


def test_the_former_convert_lpips_file_still_loads_with_its_own_linear_layers(tmp_path):
    # sqdf convert-lpips wrote one safetensors file: the trunk's features.* and lpips' lin*.
    lins = {k: torch.rand(v.shape, generator=torch.Generator().manual_seed(9))
            for k, v in package_lins().items()}  # fmt: skip
    trunk = {k: v for k, v in random_alexnet(seed=1).items() if k.startswith("features.")}
    path = tmp_path / "lpips-alex.safetensors"
    save_file({**trunk, **lins}, str(path))
    x0, x1 = _images(2, 48, seed=18), _images(2, 48, seed=19)
    got = _distance(load_lpips(path), x0, x1)
    assert torch.allclose(got, reference_lpips({**trunk, **lins}, x0, x1), rtol=1e-5)


def test_without_a_file_the_trunk_comes_from_the_torch_hub_cache(tmp_path, state):
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    with pytest.raises(ConfigError) as err:  # offline, nothing cached
        load_lpips()
    _one_line_naming(err, TRUNK_FILE, "https://download.pytorch.org/models/" + TRUNK_FILE,
                     str(cache), "--lpips FILE")  # fmt: skip
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(random_alexnet(seed=0), cache / TRUNK_FILE)  # as torchvision's download leaves it
    x0, x1 = _images(2, 40, seed=20), _images(2, 40, seed=21)
    assert torch.allclose(_distance(load_lpips(), x0, x1), reference_lpips(state, x0, x1),
                          rtol=1e-5)  # fmt: skip


def test_bad_weight_files_are_one_line_naming_the_file(tmp_path, alexnet_pth):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(ConfigError) as err:
        load_lpips(missing)
    _one_line_naming(err, "LPIPS weight file not found", str(missing))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"hello world")
    with pytest.raises(ConfigError) as err:
        load_lpips(junk)
    _one_line_naming(err, str(junk), "cannot read")
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], listed)
    with pytest.raises(ConfigError) as err:
        load_lpips(listed)
    _one_line_naming(err, str(listed), "expected a state dict of tensors, got list")
    lins_only = tmp_path / "alex.pth"  # lpips' lin file given where the trunk belongs
    torch.save(package_lins(), lins_only)
    with pytest.raises(ConfigError) as err:
        load_lpips(lins_only)
    _one_line_naming(err, str(lins_only), "not torchvision's AlexNet checkpoint")


def test_pickled_objects_other_than_tensors_are_refused_not_run(tmp_path):
    pickled = tmp_path / "object.pth"
    torch.save({**random_alexnet(seed=0), "note": fractions.Fraction(1, 3)}, pickled)
    with pytest.raises(ConfigError) as err:
        load_lpips(pickled)
    _one_line_naming(err, str(pickled), "weights_only")


def test_a_missing_or_misshapen_key_is_named(tmp_path):
    trunk = random_alexnet(seed=0)
    short = tmp_path / "short.pth"
    torch.save({k: v for k, v in trunk.items() if k != "features.6.bias"}, short)
    with pytest.raises(ConfigError) as err:
        load_lpips(short)
    _one_line_naming(err, str(short), "missing key features.6.bias")
    # lpips' vgg.pth has the same lin key names with VGG's channels: 64, 128, 256, 512, 512.
    vgg = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1)
           for i, c in enumerate([64, 128, 256, 512, 512])}  # fmt: skip
    mixed = tmp_path / "mixed.safetensors"
    save_file({k: v.contiguous() for k, v in {**trunk, **vgg}.items()}, str(mixed))
    with pytest.raises(ConfigError) as err:
        load_lpips(mixed)
    _one_line_naming(err, str(mixed), "lin1.model.1.weight", "(1, 192, 1, 1)", "(1, 128, 1, 1)")
