"""The sd task's int8 frozen base (task_params.quantize_base = "int8", torchao) on tiny
random SD 1.x and FLUX.1 parts, on the CPU: the weights are int8 per output channel within
the scheme's rounding bound, the reference pass is the plain diffusers network over those
rounded weights, the SQDF loss and LoRA gradient stay within a tolerance set by the measured
rounding error of the unquantised run's, the Linear weights hold half their bf16 bytes, and a
short run trains and resumes bitwise."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sqdf.methods import METHODS, build_method_params
from sqdf.sampling.buffer import Cells
from sqdf.sampling.sampler import sample_trajectories
from sqdf.tasks import build_task
from sqdf.tasks.quantize import tensor_bytes
from sqdf.tasks.sd_random import write_random_flux, write_random_lcm_lora, write_random_lcm_unet
from sqdf.training.trainer import train
from tests.tasks.sd_runs import sd_config, sd_pipeline, write_tiny_parts

pytest.importorskip("torchao", reason="torchao is not installed: bash scripts/setup.sh --quant")

# The loss and the LoRA gradient of the int8 base against the unquantised one, relative, at
# most LOSS_TOLERANCE times the largest relative rounding error of a quantised weight
# (|W - W_int8| / |W|, Frobenius, about 0.4% on these random weights; per-row int8 rounds each
# weight by at most max|row| / 254). A first-order bound: each quantised layer moves its
# output by about its weight's relative error, and the errors of the layers on the path add;
# measured on tiny SD 1.x: loss 0.84x, gradient 1.6x. 5x leaves room for that sum and still
# fails a broken quantisation (a scale off by a factor 2 moves the loss by tens of percent).
LOSS_TOLERANCE = 5.0


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = write_tiny_parts(tmp_path_factory.mktemp("quant"))
    write_random_flux(root / "flux")
    write_random_lcm_unet(root / "lcm")
    write_random_lcm_lora(root / "sd", root / "lcm_lora")
    return root


def config(parts, family="sd", **over):
    params = {"resolution": 16} if family == "flux" else {}
    over["task_params"] = params | over.get("task_params", {})
    return sd_config(parts / family, parts, **over)


def quantised_linears(net: nn.Module) -> dict[str, nn.Linear]:
    return {
        n: m for n, m in net.named_modules() if type(m) is nn.Linear and hasattr(m.weight, "qdata")
    }


def rounded(weight) -> torch.Tensor:
    """The int8 weight as the real numbers it stands for: int8 data times its row's scale."""
    return weight.qdata.float() * weight.scale.float().reshape(-1, 1)


def test_int8_base_rounds_each_row_and_the_reference_runs_the_rounded_weights(parts):
    task = build_task(config(parts, task_params={"quantize_base": "int8"}))
    pipe = sd_pipeline(parts / "sd")
    plain = dict(pipe.unet.named_modules())
    layers = quantised_linears(task.denoiser)
    every_linear = [n for n, m in plain.items() if type(m) is nn.Linear]
    assert len(layers) == len(every_linear) > 0  # every Linear of the UNet, LoRA's excluded
    for name, layer in layers.items():
        w = layer.weight
        assert w.qdata.dtype == torch.int8 and w.scale.shape == (w.shape[0], 1)
        assert not w.requires_grad
        original = plain[name.replace(".base_layer", "")].weight.detach()
        bound = original.abs().amax(1, keepdim=True) / 254  # half a step of max|row| / 127
        assert ((rounded(w) - original).abs() <= bound * (1 + 1e-5) + 1e-12).all(), name
    lora = [p for n, p in task.denoiser.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    # the reference (the adapter off) is the plain UNet over the rounded weights
    with torch.no_grad():
        for name, layer in layers.items():
            plain[name.replace(".base_layer", "")].weight.copy_(rounded(layer.weight))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *task.sample_shape), generator=g)
    t, cond = torch.tensor([901, 301]), torch.tensor([3, 0])
    with torch.no_grad():
        ours = task.model_output(x, t, cond, policy=False)
        pos, neg = task.text.embeds[cond], task.text.rows(cond, negative=True)[0]
        u = pipe.unet(x, t, encoder_hidden_states=neg).sample
        c = pipe.unet(x, t, encoder_hidden_states=pos).sample
    torch.testing.assert_close(ours, u + 3.0 * (c - u), rtol=1e-4, atol=1e-5)


def _loss_and_gradient(cfg, traj=None):
    torch.manual_seed(0)  # peft draws the LoRA's A matrices
    task = build_task(cfg)
    with torch.no_grad():  # B non-zero, so that the policy differs from the reference
        for name, p in task.denoiser.named_parameters():
            if ".default." in name and "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    if traj is None:
        traj = sample_trajectories(task, 2, torch.Generator().manual_seed(1))
    k, rows = torch.tensor([0, 2]), torch.arange(2)
    cells = Cells(x_t=traj.states[rows, k], x_next=traj.states[rows, k + 1], step=k,
                  cond=traj.cond, reward=torch.zeros(2), index=rows)  # fmt: skip
    loss, _ = METHODS["sqdf"].loss(task, cells, cfg, build_method_params("sqdf", {}),
                                   torch.Generator().manual_seed(2))  # fmt: skip
    loss.backward()
    grad = {n: p.grad.clone() for n, p in task.denoiser.named_parameters() if p.grad is not None}
    return task, traj, loss.detach(), grad


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_loss_and_lora_gradient_within_the_rounding_error_of_the_unquantised(parts, family):
    full, traj, loss, grad = _loss_and_gradient(config(parts, family))
    quant, _, q_loss, q_grad = _loss_and_gradient(
        config(parts, family, task_params={"quantize_base": "int8"}), traj
    )  # the same cells, sampled by the unquantised policy
    plain = dict(full.denoiser.named_modules())
    layers = quantised_linears(quant.denoiser)
    assert layers
    eps = max(
        float((rounded(m.weight) - plain[n].weight).norm() / plain[n].weight.norm())
        for n, m in layers.items()
    )  # fmt: skip
    assert 0 < eps < 0.01
    assert q_grad.keys() == grad.keys() and grad
    flat, q_flat = (torch.cat([g[n].flatten() for n in sorted(grad)]) for g in (grad, q_grad))
    loss_error = float((q_loss - loss).abs() / loss.abs())
    grad_error = float((q_flat - flat).norm() / flat.norm())
    assert loss_error <= LOSS_TOLERANCE * eps, (loss_error, eps)
    assert grad_error <= LOSS_TOLERANCE * eps, (grad_error, eps)
    assert loss_error > 0 and grad_error > 0  # the int8 weights are the ones computed with


def test_linear_weights_hold_half_their_bf16_bytes(parts):
    bf16 = build_task(config(parts, task_params={"dtype": "bfloat16"}))
    int8 = build_task(config(parts, task_params={"dtype": "bfloat16", "quantize_base": "int8"}))
    plain = dict(bf16.denoiser.named_modules())
    layers = quantised_linears(int8.denoiser)
    before = sum(tensor_bytes(plain[n].weight) for n in layers)
    after = sum(tensor_bytes(m.weight) for m in layers.values())
    rows = sum(m.weight.shape[0] for m in layers.values())
    assert all(plain[n].weight.dtype == torch.bfloat16 for n in layers)
    # one byte an element; a row's float32 scale and int8 zero point (0: symmetric)
    assert after == before // 2 + 5 * rows
    for layer in layers.values():
        assert not layer.weight.zero_point.any()
    assert after < 0.56 * before

    from sqdf.cost.parts import linear_weight_bytes, weight_bytes

    assert linear_weight_bytes(int8.denoiser) == after  # what the tracer counts
    assert weight_bytes([bf16.denoiser]) - weight_bytes([int8.denoiser]) == before - after


def test_a_short_int8_run_trains_and_resumes_bitwise(parts, tmp_path):
    def cfg(steps):
        return config(parts, steps=steps, checkpoint_every=1,
                      task_params={"quantize_base": "int8"})  # fmt: skip

    whole = train(cfg(2), tmp_path / "whole", progress=False)
    weights = load_file(str(whole / "final" / "policy.safetensors"))
    assert weights and all("lora_" in k for k in weights)  # the adapter alone is saved
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k)
    part = tmp_path / "part"
    train(cfg(1), part, progress=False)
    train(cfg(2), part, resume=True, progress=False)
    resumed = load_file(str(part / "final" / "policy.safetensors"))
    assert resumed.keys() == weights.keys()
    assert all(torch.equal(resumed[k], v) for k, v in weights.items())


@pytest.mark.parametrize("lcm", ["lcm", "lcm_lora/pytorch_lora_weights.safetensors"])
def test_consistency_models_run_over_the_int8_base(parts, lcm):
    """An LCM UNet is a second frozen denoiser: its Linear weights are int8 too. An LCM-LoRA
    sits on the int8 base beside the policy's adapter, frozen. Either way x̂0 is finite and
    carries a gradient to the state."""
    params = {"quantize_base": "int8", "lcm": str(parts / lcm)}
    task = build_task(config(parts, estimator="consistency", task_params=params))
    if task._consistency_net is not None:
        assert quantised_linears(task._consistency_net)
    else:
        assert any(".lcm." in n for n, _ in task.denoiser.named_parameters())
    trainable = [n for n, p in task.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    x = torch.randn((2, *task.sample_shape), generator=torch.Generator().manual_seed(3))
    x.requires_grad_()
    x0 = task.consistency_x0(x, torch.tensor([600, 100]), torch.tensor([2, 7]))
    x0.square().sum().backward()
    assert torch.isfinite(x0).all() and float(x.grad.abs().sum()) > 0
