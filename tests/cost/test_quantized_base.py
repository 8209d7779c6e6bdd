"""The trace of an int8 frozen base (task_params.quantize_base = "int8"): torchao's int8
weights built on meta hold the bytes the same network holds on the CPU, the products are the
same, and the dry run offers the setting where a run does not fit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sqdf.config.train_config import TrainConfig
from sqdf.cost.report import levers, trace_run
from sqdf.cost.update import gpu_peak

pytest.importorskip("torchao", reason="torchao is not installed: bash scripts/setup.sh --quant")


def _config(model, **params) -> TrainConfig:
    return TrainConfig(task="sd", estimator="tweedie", batch_size=2, grad_accum=2,
                       reward="aesthetic", task_params={"model": str(model), "resolution": 32,
                                                        **params})  # fmt: skip


def _held_bytes(net: torch.nn.Module) -> int:
    """Bytes of the storages a real (CPU) network's parameters and buffers hold: for an int8
    weight, the storages of its int8 data, scales and zero points."""
    storages = {}
    for t in [*net.parameters(), *net.buffers()]:
        inner = [getattr(t, n) for n in t.__tensor_flatten__()[0]] if hasattr(t, "qdata") else [t]
        for x in inner:
            storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
    return sum(storages.values())


def test_the_trace_holds_the_int8_base_as_the_cpu_network_does(model):
    from diffusers import UNet2DConditionModel

    from sqdf.tasks.finetune import PolicyAndReference
    from sqdf.tasks.quantize import quantize_base
    from sqdf.tasks.sd_family import read_config

    bf16, int8 = trace_run(_config(model)), trace_run(_config(model, quantize_base="int8"))
    net = UNet2DConditionModel.from_config(read_config(model, "unet")).to(torch.bfloat16)
    quantize_base(net, "int8")
    PolicyAndReference(net, "lora", 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    for p in net.parameters():  # the LoRA in the compute dtype, as the trace builds it
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    assert int8.parts["denoiser"] == _held_bytes(net)
    linears = [
        m for m in net.modules() if type(m) is torch.nn.Linear and hasattr(m.weight, "qdata")
    ]
    rows = sum(m.weight.shape[0] for m in linears)
    elements = sum(m.weight.numel() for m in linears)
    # bf16 Linear weights (2 bytes an element) become 1 byte an element and 5 bytes a row
    assert bf16.parts["denoiser"] - int8.parts["denoiser"] == elements - 5 * rows
    assert int8.denoiser_linear == elements + 5 * rows
    # the same products: sampling runs the base as bf16 does, without gradients
    assert int8.flops["sampling"] == bf16.flops["sampling"]
    assert int8.flops["reference step"] == bf16.flops["reference step"]


def test_the_int8_base_is_a_lever_after_the_batch_and_lowers_the_peak(model):
    cfg = dataclasses.replace(_config(model), batch_size=2)
    found = levers(cfg)
    flags = [flag for flag, _ in found]
    at = next(i for i, f in enumerate(flags) if f.startswith("--task-param quantize_base=int8"))
    assert all("--batch-size" in f for f in flags[at - 1 : at])  # after the batch levers
    assert all("resolution" in f for f in flags[at + 1 :])
    before = found[at - 1][1] if at else cfg
    after = found[at][1]
    assert after.task_params["quantize_base"] == "int8"
    assert after.batch_size == before.batch_size and after.grad_accum == before.grad_accum
    assert gpu_peak(trace_run(after)) < gpu_peak(trace_run(before))
    # a run already on the int8 base is not offered it again
    quantised = dataclasses.replace(cfg, task_params={**cfg.task_params, "quantize_base": "int8"})
    assert not any("quantize_base" in f for f, _ in levers(quantised))
