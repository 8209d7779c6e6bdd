"""The exact 2-D benchmark: reference, policy at initialisation, target and metrics."""

import pytest
import torch

from sqdf.config.train_config import TrainConfig
from sqdf.core.gmm import gmm_posterior_mean
from sqdf.errors import ConfigError
from sqdf.evaluators.metrics import mode_tv, sliced_w2
from sqdf.sampling.sampler import sample_trajectories
from sqdf.tasks import build_task


def task(**kw):
    torch.manual_seed(0)
    return build_task(TrainConfig(device="cpu", num_steps=50, **kw))


def test_policy_starts_as_the_reference():
    t = task()
    x = torch.randn(8, 2)
    steps = torch.full((8,), 500)
    assert torch.equal(
        t.model_output(x, steps, torch.zeros(8), policy=True),
        t.model_output(x, steps, torch.zeros(8), policy=False),
    )


def test_reference_tweedie_is_the_exact_posterior_mean():
    t = task()
    x = torch.randn(8, 2, dtype=torch.float64)
    k = torch.full((8,), 30)  # a state part way: the kernel calls the model at its time
    abar = t.schedule.abar(t.kernel.model_time(k)).double()
    torch.testing.assert_close(
        t.reference_x0(x, k, torch.zeros(8)), gmm_posterior_mean(t.data, x, abar)
    )


def test_reference_sampler_reaches_the_data():
    t = task()
    x0 = sample_trajectories(t, 4000, torch.Generator().manual_seed(0), policy=False).x0
    ref_out = t.reference_output()
    assert mode_tv(x0, ref_out) < 0.04
    exact = ref_out.sample(4000, torch.Generator().manual_seed(1))
    assert sliced_w2(x0, exact, torch.Generator().manual_seed(2)) < 0.1


def test_metrics_of_exact_target_samples_are_near_zero():
    t = task(alpha=1.0, reward="quadratic")
    target = t.target()
    g = torch.Generator().manual_seed(0)
    a, b = target.sample(4000, g), target.sample(4000, g)
    assert mode_tv(a, target) < 0.03
    assert sliced_w2(a, b, g) < 0.08
    # and far from it when shifted: sliced W2 of a shift m in 2-D is |m| / sqrt(2)
    assert sliced_w2(a + torch.tensor([1.0, 0.0], dtype=a.dtype), b, g) == pytest.approx(
        2**-0.5, abs=0.05
    )


def test_explicit_mixture_and_bad_parameters():
    t = task(task_params={"means": [[0, 0], [2, 2]], "stds": [0.5, 0.2], "weights": [3, 1]})
    torch.testing.assert_close(t.data.weights, torch.tensor([0.75, 0.25], dtype=torch.float64))
    with pytest.raises(ConfigError, match="unknown parameter 'radiu'"):
        task(task_params={"radiu": 2.0})
    with pytest.raises(ConfigError, match="stds"):
        task(task_params={"means": [[0, 0]], "stds": [0.5, 0.1]})
    with pytest.raises(ConfigError, match="curvature"):
        task(reward="quadratic", reward_params={"curvature": -1.0})
    with pytest.raises(ConfigError, match="unknown parameter 'c'"):
        task(reward="linear", reward_params={"c": 1.0})
    with pytest.raises(ConfigError, match="b must have 2 entries"):
        task(reward="linear", reward_params={"b": [1.0, 0.0, 0.0]})
    with pytest.raises(ConfigError, match="reward 'quadratic'"):
        task(reward="quadratic", reward_params={"curvature": [1.0]})
