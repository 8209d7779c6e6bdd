"""A user's own reward given as module:function."""

import sys

import pytest
import torch

from sqdf import TrainConfig, train
from sqdf.errors import ConfigError, SqdfError
from sqdf.rewards import build_reward
from sqdf.tasks import sample_shape
from tests.learning import assert_reward_rose


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "import torch\n"
        "CALLS = []\n"
        "def brightness(images, cond, scale=1.0):\n"
        "    CALLS.append((tuple(images.shape), getattr(cond, 'dtype', None),\n"
        "                  getattr(cond, 'shape', None), images.requires_grad))\n"
        "    return scale * images.flatten(1).mean(1)\n"
        "def wrong_shape(images, cond):\n"
        "    return images.sum()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_custom_reward_with_params(user_module):
    r = build_reward(f"{user_module}:brightness", {"scale": 3.0})
    assert torch.allclose(r(torch.ones(2, 1, 4, 4), None), torch.full((2,), 3.0))


def test_a_dry_run_finds_a_users_module_alone_or_in_a_mixture(user_module, capsys):
    # a mixture's custom part is found as a lone one is (the plan looks the module up on the
    # path; a bad name is refused, tests/test_bad_input.py)
    from sqdf.cli import main

    for reward in (f"{user_module}:brightness", f"linear=1,{user_module}:brightness=0.5"):
        assert main(["train", "--reward", reward, "--dry-run"]) == 0, capsys.readouterr().err
        assert "cannot import" not in capsys.readouterr().out


def test_custom_reward_errors(user_module):
    with pytest.raises(ConfigError, match="cannot import module 'nope'"):
        build_reward("nope:f", {})
    with pytest.raises(ConfigError, match="has no function 'missing'"):
        build_reward(f"{user_module}:missing", {})
    with pytest.raises(ConfigError, match="module:function"):
        build_reward(":f", {})
    r = build_reward(f"{user_module}:wrong_shape", {})
    with pytest.raises(SqdfError, match=r"shape \(2,\)"):
        r(torch.ones(2, 1, 4, 4), None)


def test_custom_reward_trains_the_digits_task(user_module, tmp_path):
    cfg = TrainConfig(
        task="digits",
        reward=f"{user_module}:brightness",
        device="cpu",
        num_steps=3,
        batch_size=2,
        buffer_size=4,
        steps=1,
        checkpoint_every=0,
    )
    run = train(cfg, tmp_path / "run", progress=False)
    calls = list(sys.modules[user_module].CALLS)
    # the fresh batch is scored without a gradient, the loss's x̂0 with one; both are a batch
    # of digit images with their class labels
    image = (cfg.batch_size, *sample_shape(cfg))
    assert (image, torch.long, (cfg.batch_size,), False) in calls
    assert (image, torch.long, (cfg.batch_size,), True) in calls
    assert {shape for shape, *_ in calls} == {image}
    assert_reward_rose(run)  # the images got brighter than the reference's


def test_a_users_reward_takes_infinity_sqdfs_own_parameters_do_not(user_module):
    """Infinity may mean "no limit" to a user's function: its own parameters reach it as given,
    alone or as a mixture's part. sqdf's own settings and rewards' parameters refuse it."""
    spec = f"{user_module}:brightness"
    cfg = TrainConfig(task="digits", reward=spec, reward_params={"cap": float("inf")})
    assert cfg.reward_params == {"cap": float("inf")}
    mixed = f"{spec}=1,ink=1"
    cfg = TrainConfig(task="digits", reward=mixed, reward_params={f"{spec}.cap": float("inf")})
    assert cfg.reward_params[f"{spec}.cap"] == float("inf")
    with pytest.raises(ConfigError, match="reward_params.ink.scale must be a finite number"):
        TrainConfig(task="digits", reward=mixed, reward_params={"ink.scale": float("inf")})
    with pytest.raises(ConfigError, match="reward_params.scale must be a finite number"):
        TrainConfig(task="digits", reward="ink", reward_params={"scale": float("inf")})
    with pytest.raises(ConfigError, match="task_params.noise must be a finite number"):
        TrainConfig(task="digits", reward=spec, task_params={"noise": float("nan")})
