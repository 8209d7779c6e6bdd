"""FID on Inception features through torchmetrics, with a random-initialised InceptionV3 of
torch-fidelity's own class loaded from a file written here, against torch-fidelity's network
called directly and the Fréchet distance of its features (metric_weights.reference_fid)."""

import fractions
from pathlib import Path

import pytest
import torch

from sqdf.errors import ConfigError
from sqdf.evaluators.fid import WEIGHTS_FILE, inception_fid, load_fid
from tests.evaluators.metric_weights import reference_fid, write_random_inception


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_random_inception(tmp_path_factory.mktemp("fid") / WEIGHTS_FILE)


def _images(n: int, size: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_fid_equals_the_frechet_distance_of_torch_fidelity_features(weights):
    # 5 against 5 in batches of 3 (a partial last batch): rank-4 covariances in 2048 dims,
    # where torchmetrics' formula and ours agree to ~2e-7 (test_feature_stats); float32
    # features batched differently add round-off well under 1e-4.
    a, b = _images(5, 40, seed=1), _images(5, 40, seed=2, scale=0.6)
    metric = load_fid(weights)
    ours = inception_fid(metric, a, b, batch_size=3)
    assert ours == pytest.approx(reference_fid(weights, a, b), rel=1e-4)
    assert ours > 0
    # the metric is reset between calls: a set against itself is 0, whatever came before
    assert inception_fid(metric, a[:3], a[:3]) == pytest.approx(0.0, abs=1e-3 * ours)


def test_without_a_file_torch_fidelity_reads_the_torch_hub_cache(tmp_path, weights):
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    with pytest.raises(ConfigError) as err:  # offline, nothing cached
        load_fid()
    message = str(err.value)
    assert "\n" not in message and str(cache) in message and "--fid FILE" in message
    assert "https://github.com/toshas/torch-fidelity/releases/" in message
    cache.mkdir(parents=True, exist_ok=True)
    (cache / WEIGHTS_FILE).write_bytes(weights.read_bytes())  # as torch-fidelity leaves it
    a, b = _images(3, 32, seed=3), _images(3, 32, seed=4)
    assert inception_fid(load_fid(), a, b) == pytest.approx(inception_fid(load_fid(weights), a, b))


def test_torch_fidelity_reads_the_file_as_weights_only(tmp_path, weights):
    # torch-fidelity calls torch.load(weights_only=False); a pickled object must still be
    # refused before it is constructed, not loaded and then found to be an unexpected key.
    pickled = tmp_path / "object.pth"
    torch.save({**torch.load(weights, weights_only=True), "x": fractions.Fraction(1, 3)}, pickled)
    with pytest.raises(ConfigError) as err:
        load_fid(pickled)
    assert "weights_only" in str(err.value) and str(pickled) in str(err.value)
    missing = tmp_path / "none.pth"
    with pytest.raises(ConfigError, match="FID Inception weight file not found"):
        load_fid(missing)
    foreign = tmp_path / "foreign.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(ConfigError) as err:
        load_fid(foreign)
    assert "\n" not in str(err.value) and str(foreign) in str(err.value)
