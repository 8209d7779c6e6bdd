"""The x̂0-by-timestep measurement on the exact benchmark, where both estimators are exact."""

import torch

from sqdf.config.train_config import TrainConfig
from sqdf.evaluation.x0_quality import x0_estimator_quality
from sqdf.tasks import build_task


def test_estimates_sharpen_as_noise_falls():
    torch.manual_seed(0)
    task = build_task(TrainConfig(device="cpu", num_steps=20, task_params={"ode_steps": 8}))
    q = x0_estimator_quality(task, num_samples=256)
    assert len(q["step"]) == 19 and q["timestep"][0] > q["timestep"][-1]
    for name in ("tweedie", "cm"):
        assert q[f"{name}_rmse"][-1] < 0.1 < q[f"{name}_rmse"][0]
        assert q[f"{name}_corr"][-1] > 0.99
    # the ODE endpoint is a sample-like point: at high noise it is farther from the
    # trajectory's own x0 than the posterior mean (which minimises the expected distance)
    assert q["cm_rmse"][0] > q["tweedie_rmse"][0]
