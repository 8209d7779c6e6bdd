"""What every metric test here shares: no network, and an empty torch hub cache."""

import pytest

from tests.evaluators.metric_weights import offline


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch, tmp_path):
    """Nothing here may reach the network, and the torch hub cache starts empty."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with offline():
        yield
