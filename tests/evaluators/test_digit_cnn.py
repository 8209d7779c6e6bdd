"""The independent digit evaluator: safe loading of the third-party CNN and its metrics."""

import importlib.machinery
import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sqdf.assets.digits_data import load_digits
from sqdf.errors import SqdfError
from sqdf.evaluators import DigitEvaluator

PIP_COMMAND = "pip install --no-deps digit-recognizer-py==0.1.0"


@pytest.fixture(scope="module")
def evaluator() -> DigitEvaluator:
    return DigitEvaluator.load()


@pytest.fixture(scope="module")
def real_metrics(evaluator: DigitEvaluator) -> dict[str, float]:
    return evaluator.real_digit_metrics()


@pytest.fixture(scope="module")
def real_subset() -> tuple[torch.Tensor, torch.Tensor]:
    """50 real 16×16 digits per class."""
    images, labels = load_digits(size=16)
    idx = torch.cat([torch.nonzero(labels == c).flatten()[:50] for c in range(10)])
    return images[idx], labels[idx]


def _installed_weights() -> Path:
    # Found independently of the code under test, the same way pip lays the package out.
    spec = importlib.util.find_spec("digit_recognizer")
    return Path(spec.submodule_search_locations[0]) / "models" / "handwriting_model.pth"


def _pretend_package_at(monkeypatch: pytest.MonkeyPatch, location: Path | None) -> None:
    """Make find_spec report digit_recognizer as absent (None) or installed at location."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name != "digit_recognizer":
            return real_find_spec(name, *args, **kwargs)
        if location is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(location)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_package_is_an_sqdf_error_naming_the_pip_command(monkeypatch):
    _pretend_package_at(monkeypatch, None)
    with pytest.raises(SqdfError, match=re.escape(PIP_COMMAND)):
        DigitEvaluator.load()


def test_missing_weight_file_is_an_sqdf_error(monkeypatch, tmp_path):
    _pretend_package_at(monkeypatch, tmp_path)
    with pytest.raises(SqdfError, match=re.escape(PIP_COMMAND)):
        DigitEvaluator.load()


def test_corrupt_weight_file_is_an_sqdf_error_not_random_weights(monkeypatch, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "handwriting_model.pth").write_bytes(b"not a checkpoint")
    _pretend_package_at(monkeypatch, tmp_path)
    with pytest.raises(SqdfError, match=re.escape(PIP_COMMAND)):
        DigitEvaluator.load()


def test_weights_are_loaded_with_weights_only(monkeypatch):
    calls = []
    real_load = torch.load

    def spy_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    DigitEvaluator.load()
    assert calls and all(kwargs.get("weights_only") is True for kwargs in calls)


def test_load_never_imports_the_package():
    DigitEvaluator.load()
    assert "digit_recognizer" not in sys.modules


def test_loaded_weights_equal_the_files_tensors(evaluator):
    expected = torch.load(_installed_weights(), map_location="cpu", weights_only=True)
    loaded = evaluator.model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key
    assert not evaluator.model.training


def test_features_are_the_penultimate_activations(evaluator):
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    captured = {}
    hook = evaluator.model.fc_layers[1].register_forward_hook(
        lambda module, inputs, output: captured.update(relu=output)
    )
    try:
        logits = evaluator.model(x)
    finally:
        hook.remove()
    torch.testing.assert_close(evaluator.model.features(x), captured["relu"])
    assert captured["relu"].shape == (4, 256) and logits.shape == (4, 10)


def test_prepare_normalises_28_and_resizes_16_differentiably():
    x28 = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(DigitEvaluator.prepare(x28), (x28 - 0.1307) / 0.3081)
    # Bilinear resizing keeps a constant image constant.
    flat = torch.full((2, 1, 16, 16), 0.25, requires_grad=True)
    out = DigitEvaluator.prepare(flat)
    assert out.shape == (2, 1, 28, 28)
    torch.testing.assert_close(out, torch.full_like(out, (0.25 - 0.1307) / 0.3081))
    out.sum().backward()
    assert flat.grad is not None and flat.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        DigitEvaluator.prepare(torch.rand(2, 3, 16, 16))


def test_chunked_logits_and_features_match_one_pass(evaluator):
    # More images than one chunk of 512, so chunk order and concatenation are exercised.
    images = torch.rand(600, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    x = (F.interpolate(images, size=(28, 28), mode="bilinear") - 0.1307) / 0.3081
    with torch.no_grad():
        torch.testing.assert_close(evaluator.logits(images), evaluator.model(x))
        torch.testing.assert_close(evaluator.features(images), evaluator.model.features(x))


def test_real_digits_are_recognised(real_metrics):
    assert real_metrics["agreement"] >= 0.95
    assert 0.5 < real_metrics["confidence"] <= 1.0
    assert real_metrics["diversity"] > 0.0
    assert real_metrics["vendi"] > 1.0


def test_agreement_compares_against_the_requested_label(evaluator, real_subset):
    images, labels = real_subset
    assert evaluator.metrics(images, labels)["agreement"] >= 0.95
    assert evaluator.metrics(images, (labels + 1) % 10)["agreement"] <= 0.05


def test_noise_disagrees_and_is_far_from_real_digits(evaluator, real_metrics):
    g = torch.Generator().manual_seed(3)
    noise = torch.rand(500, 1, 16, 16, generator=g)
    labels = torch.randint(0, 10, (500,), generator=g)
    metrics = evaluator.metrics(noise, labels)
    assert metrics["agreement"] < 0.3
    assert metrics["frechet"] > 10 * real_metrics["frechet"]


def test_blank_images_have_no_diversity(evaluator, real_metrics):
    labels = torch.arange(10).repeat(10)
    metrics = evaluator.metrics(torch.zeros(100, 1, 16, 16), labels)
    assert metrics["diversity"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["vendi"] == pytest.approx(1.0, abs=1e-6)
    assert real_metrics["diversity"] > 1.0


def test_frechet_against_given_reference(evaluator, real_subset):
    images, labels = real_subset
    own = evaluator.features(images)
    assert evaluator.metrics(images, labels, reference_features=own)["frechet"] < 1e-6


def test_labels_must_match_the_images(evaluator):
    with pytest.raises(ValueError, match="labels"):
        evaluator.metrics(torch.rand(4, 1, 16, 16), torch.zeros(3, dtype=torch.long))


def _mean_distance_over_pairs(feats: torch.Tensor) -> torch.Tensor:
    i, j = torch.triu_indices(len(feats), len(feats), offset=1)
    return torch.cdist(feats, feats)[i, j].mean()


def test_diversity_averages_over_classes_with_two_or_more_images(evaluator):
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2])
    feats = evaluator.features(images)
    # Class 1 has a single image: it has no pairs, so it is left out, not counted as 0.
    expected = (_mean_distance_over_pairs(feats[:3]) + _mean_distance_over_pairs(feats[4:])) / 2
    assert evaluator.metrics(images, labels)["diversity"] == pytest.approx(
        float(expected), rel=1e-5
    )
    lone = evaluator.metrics(images[:2], torch.tensor([0, 1]))
    assert math.isnan(lone["diversity"]) and math.isnan(lone["vendi"])
