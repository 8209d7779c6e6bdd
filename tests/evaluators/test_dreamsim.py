"""DreamSim diversity from the dreamsim package's own loader and classes, on a random-initialised
clip_vitb32 checkpoint written here in the layout the package unzips (the smallest model its
loader builds without torch.hub: a ViT-B/32), against the package's own distance function."""

import itertools
from pathlib import Path

import pytest
import torch
from torchvision.transforms.functional import to_pil_image

from sqdf.errors import ConfigError
from sqdf.evaluators.dreamsim import default_folder, load_dreamsim
from tests.evaluators.metric_weights import write_random_dreamsim


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_random_dreamsim(tmp_path_factory.mktemp("dreamsim"))


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_mean_pairwise_equals_the_package_distance_over_every_pair(folder):
    from dreamsim import dreamsim

    sim = load_dreamsim(folder, "clip_vitb32")
    # the package's own model, loaded again, and its own preprocessing and forward per pair
    model, preprocess = dreamsim(pretrained=True, device="cpu", cache_dir=str(folder),
                                 dreamsim_type="clip_vitb32")  # fmt: skip
    x = _images(4, 48, seed=1)
    x[3] = x[0]  # a copy: one pair at distance 0
    pil = [preprocess(to_pil_image(image)) for image in x]
    with torch.no_grad():
        loop = [float(model(pil[i], pil[j])) for i, j in itertools.combinations(range(4), 2)]
    assert min(loop) == pytest.approx(0.0, abs=1e-6) and max(loop) > 1e-3
    assert sim.mean_pairwise(x) == pytest.approx(sum(loop) / len(loop), rel=1e-5)


def test_the_checkpoint_s_lora_is_applied(folder):
    sim = load_dreamsim(folder, "clip_vitb32")
    x = _images(2, 32, seed=2)
    with torch.no_grad(), sim.model.disable_adapter():
        base = sim.embed(x)
    assert not torch.allclose(sim.embed(x), base, atol=1e-4)


def test_without_a_folder_the_checkpoint_is_read_from_the_torch_hub_folder(tmp_path, folder):
    default = tmp_path / "torch_home" / "hub" / "dreamsim"
    assert default_folder() == default
    with pytest.raises(ConfigError) as err:  # offline, nothing there
        load_dreamsim(None, "clip_vitb32")
    message = str(err.value)
    assert "\n" not in message and str(default) in message and "--dreamsim FOLDER" in message
    assert "https://github.com/ssundaram21/dreamsim/releases/" in message
    for path in folder.iterdir():  # as the package's download leaves the folder
        (default / path.name).symlink_to(path)
    x = _images(3, 32, seed=3)
    assert load_dreamsim(None, "clip_vitb32").mean_pairwise(x) == pytest.approx(
        load_dreamsim(folder, "clip_vitb32").mean_pairwise(x), rel=1e-6
    )


def test_unknown_type_and_missing_folder_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="unknown DreamSim type 'vit_tiny'; known: ensemble"):
        load_dreamsim(tmp_path, "vit_tiny")
    with pytest.raises(ConfigError, match="DreamSim weights folder not found"):
        load_dreamsim(tmp_path / "nowhere", "clip_vitb32")
