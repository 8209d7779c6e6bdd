"""A LoRA run's frozen base in 8 bits: every ``nn.Linear`` weight of the denoiser quantised to
int8, weight-only, one scale per output channel (torchao's ``Int8WeightOnlyConfig``:
symmetric, scale = max |row| / 127), before the LoRA is added.

peft then wraps each quantised Linear in its ``TorchaoLoraLinear``: the adapter's A and B stay
float32 and train over the int8 product, and the reference (the adapter switched off) runs
the same int8 weights. A row's rounding error is at most half its scale, max |row| / 254.
Convolutions, norms and embeddings keep the loaded dtype; only the Linear weights shrink, to
one byte an element plus a float32 scale and an int8 zero point (0) a row: half their bf16
bytes and 5 bytes a row, a quarter of float32's.

torchao's weight-only product casts the int8 weight to the activations' dtype for each call,
and autograd keeps that copy for the backward of a call with gradients: under gradient
checkpointing one block's copies at a time, without it every call's (``sqdf.cost`` traces it).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from sqdf.errors import ConfigError

QUANTIZE_BASE = ("none", "int8")


def check_quantize_base(value: Any, finetune: str, task: str) -> None:
    """Refuse a value other than QUANTIZE_BASE's, a quantised base under full fine-tuning
    (its weights are the ones that train), and int8 without torchao installed."""
    if value not in QUANTIZE_BASE:
        raise ConfigError(
            f"{task} quantize_base must be one of {', '.join(QUANTIZE_BASE)}, got {value!r}"
        )
    if value == "none":
        return
    if finetune != "lora":
        raise ConfigError(
            f"{task} quantize_base {value}: the quantised base is the frozen one under a LoRA; "
            f"finetune {finetune} trains every weight (use finetune=lora or quantize_base=none)"
        )
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{task} quantize_base {value} needs torchao: pip install 'sqdf[quant]' (or "
            "quantize_base=none)"
        ) from None


def quantize_base(net: nn.Module, kind: str) -> int:
    """Quantise every nn.Linear weight of ``net`` in place as ``kind`` says (none: nothing),
    frozen; the number of layers quantised. Call it before the LoRA is added: peft then wraps
    each quantised layer in its torchao LoRA layer, and the LoRA's own layers stay float."""
    if kind == "none":
        return 0
    from torchao.quantization import Int8WeightOnlyConfig, PerRow, quantize_

    chosen = {id(m) for m in net.modules() if type(m) is nn.Linear}
    # set_inductor_config False: torchao would otherwise change torch.compile's settings for
    # the whole process
    config = Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False, version=2)
    quantize_(net, config, filter_fn=lambda m, _name: id(m) in chosen)
    return len(chosen)


def tensor_bytes(t: Tensor) -> int:
    """Bytes of the storage ``t`` holds: a quantised weight's are its inner tensors' (int8
    data and scales), not its nominal dtype's."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def inner_tensors(t: Tensor) -> list[Tensor]:
    """The plain tensors holding ``t``'s storage (``t`` itself unless it is a wrapper)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return [inner for n in names for inner in inner_tensors(getattr(t, n))]
    return [t]
