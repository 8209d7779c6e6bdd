"""Full fine-tuning (task_params.finetune = "full"): every weight of the backbone trains and
the reference is a frozen copy of the pretrained network."""

from __future__ import annotations

import pytest
import torch

from sqdf.config.train_config import TrainConfig
from sqdf.errors import ConfigError
from sqdf.evaluation.evaluate import load_run
from sqdf.tasks import build_task
from sqdf.tasks.digits import shipped_model
from sqdf.tasks.digits_model import cfg_eps, load_unet
from sqdf.training.trainer import train


def digits(**task_params) -> TrainConfig:
    return TrainConfig(
        task="digits", reward="ink", num_steps=4, batch_size=4, buffer_size=8, steps=2,
        estimator="tweedie", device="cpu", lr=1e-3,
        task_params={"finetune": "full", **task_params},
    )  # fmt: skip


def test_full_policy_is_the_whole_unet_and_starts_as_the_reference():
    task = build_task(digits())
    base = load_unet(shipped_model() / "unet", "digits base model")
    n_base = sum(p.numel() for p in base.parameters())
    assert task.policy is task.unet and task.shardable
    assert sum(p.numel() for p in task.policy.parameters() if p.requires_grad) == n_base
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, *task.sample_shape), generator=g)
    t, cond = torch.tensor([900, 500, 20]), torch.tensor([1, 7, 3])
    with torch.no_grad():
        expected = cfg_eps(base, x, t, cond, 1.0)
        torch.testing.assert_close(task.model_output(x, t, cond, policy=False), expected)
        torch.testing.assert_close(task.model_output(x, t, cond, policy=True), expected)


def test_training_moves_the_policy_and_leaves_the_reference(tmp_path):
    cfg = digits()
    run = train(cfg, tmp_path / "run", progress=False)
    task = load_run(run)  # the run's final weights, loaded the way sqdf eval does
    base = load_unet(shipped_model() / "unet", "digits base model")
    # every UNet weight is in the saved policy, and some moved
    final = task.policy.state_dict()
    assert set(final) == set(base.state_dict())
    assert any(not torch.equal(final[k], v) for k, v in base.state_dict().items())
    for k, v in task.nets.reference_net.state_dict().items():
        assert torch.equal(v, base.state_dict()[k]), k


def test_bad_finetune_value_is_named():
    with pytest.raises(ConfigError, match="digits finetune must be one of lora, full, got 'half'"):
        build_task(digits(finetune="half"))


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_channels_last_changes_the_layout_not_the_outputs(finetune):
    plain = build_task(digits(finetune=finetune))
    fast = build_task(digits(finetune=finetune, channels_last=True))
    conv = next(
        m.weight for m in fast.unet.modules()
        if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1 and m.kernel_size == (3, 3)
    )  # fmt: skip
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    g = torch.Generator().manual_seed(1)
    x = torch.randn((4, *plain.sample_shape), generator=g)
    t, cond = torch.tensor([999, 600, 300, 1]), torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        for policy in (True, False):
            torch.testing.assert_close(
                fast.model_output(x, t, cond, policy=policy),
                plain.model_output(x, t, cond, policy=policy), rtol=1e-4, atol=1e-5,
            )  # fmt: skip


def test_compile_compiles_each_network_once(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    lora = build_task(digits(finetune="lora", compile=True))
    assert compiled == [lora.unet]  # one network: the adapter switches on and off in it
    compiled.clear()
    full = build_task(digits(finetune="full", compile=True))
    assert compiled == [full.unet, full.nets.reference_net]


@pytest.mark.parametrize("key", ["compile", "channels_last"])
def test_speed_options_must_be_booleans(key):
    with pytest.raises(ConfigError, match=f"digits {key} must be true or false, got 'yes'"):
        build_task(digits(**{key: "yes"}))
