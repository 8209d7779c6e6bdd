"""The same runs on a CUDA device (skipped where there is none): catches CPU/GPU tensor mix-ups."""

import pytest
import torch

from sqdf import TrainConfig, evaluate_run, train
from sqdf.demo import run_demo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("estimator", ["tweedie", "consistency"])
@pytest.mark.parametrize("buffer", ["uniform", "prioritized"])
def test_gmm2d_on_gpu(tmp_path, estimator, buffer):
    cfg = TrainConfig(
        device="cuda",
        estimator=estimator,
        buffer=buffer,
        num_steps=10,
        steps=4,
        batch_size=16,
        buffer_size=32,
        checkpoint_every=2,
    )
    run = train(cfg, tmp_path / "run", progress=False)
    train(cfg.__class__(**{**cfg.to_dict(), "steps": 6}), run, resume=True, progress=False)
    assert evaluate_run(run, num_samples=64)["kl_path"] >= 0


@pytest.mark.parametrize("estimator", ["tweedie", "consistency"])
def test_digits_and_demo_on_gpu(tmp_path, estimator):
    page = run_demo(
        tmp_path / "demo",
        num_samples=16,
        progress=False,
        quality_samples=8,
        steps=2,
        num_steps=6,
        batch_size=4,
        buffer_size=8,
        device="cuda",
        estimator=estimator,
        checkpoint_every=0,
    )
    assert page.exists()
