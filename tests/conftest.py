import os

# The tests never reach the Hugging Face Hub: a weight that is not given nor in a cache the
# test filled is an error at once, not five network retries (set before huggingface_hub is
# imported, which reads it once).
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from sqdf.config.train_config import TrainConfig


@pytest.fixture
def tiny_config() -> TrainConfig:
    """A gmm2d run small enough to train in about a second."""
    return TrainConfig(
        num_steps=10,
        steps=6,
        batch_size=16,
        buffer_size=64,
        log_every=2,
        checkpoint_every=3,
        device="cpu",
        estimator="tweedie",
        task_params={"hidden": 16},
    )


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n 2``: one worker per core) each worker runs torch on one
    thread, and so do the processes its tests start (the CLI, benchmarks, launchers), so that
    two workers do not oversubscribe the cores."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
