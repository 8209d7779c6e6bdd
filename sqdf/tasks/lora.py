"""A peft LoRA on a frozen backbone: the policy is the adapter, the reference the same
network with the adapter switched off (never a second copy of the weights)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from sqdf.errors import ConfigError

LORA_KEY = "lora_"
POLICY_ADAPTER = "default"  # peft's name for the first adapter


# peft's warning that a LoRA layer over a torchao-quantised weight, built outside
# transformers, cannot merge the adapter into it: sqdf never merges (the adapter is saved alone)
UNMERGEABLE_WARNING = ".*get_apply_tensor_subclass.*"


# how A is drawn (B is zero either way): peft's default, Kaiming-uniform with a = sqrt(5)
# (|A| <= 1 / sqrt(fan_in), std 1 / sqrt(3 fan_in)); or gaussian, normal with std 1 / rank
# (variance 1 / rank^2; the SQDF reference code's, T2I/sd_pipeline.py line 1731): a std
# 0.25 sqrt(3 fan_in) times the default's at rank 4, 7.7x to 15.5x at SD 1.5's fan_in of
# 320 to 1280
LORA_INITS = {"default": True, "gaussian": "gaussian"}


def check_lora_init(init: str, task: str) -> None:
    if init not in LORA_INITS:
        raise ConfigError(f"{task} lora_init must be one of {', '.join(LORA_INITS)}, got {init!r}")


def add_lora(
    model: nn.Module, rank: int, alpha: float, target_modules: list[str], init: str = "default"
) -> nn.Module:
    """Inject LoRA adapters, A drawn as ``init`` says (``LORA_INITS``); peft zero-initialises
    B, so the policy starts as the reference."""
    model.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=target_modules,
        init_lora_weights=LORA_INITS[init],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=UNMERGEABLE_WARNING)
        return inject_adapter_in_model(config, model, adapter_name=POLICY_ADAPTER)


def is_policy_weight(name: str) -> bool:
    """Whether a parameter or state-dict key belongs to the policy's LoRA adapter."""
    return LORA_KEY in name and f".{POLICY_ADAPTER}." in name


def activate_only(model: nn.Module, name: str | None) -> None:
    """Make adapter ``name`` the only active one (None: no adapter), changing nothing else.

    peft's own ``set_adapter`` also flips requires_grad, which would unfreeze another
    adapter (or freeze the policy's in the middle of a loss); this switches the active set.
    """
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            layer._active_adapter = [name] if name is not None else []


@contextmanager
def only_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Run with adapter ``name`` alone active (e.g. an LCM-LoRA beside the policy's)."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [layer._active_adapter for layer in layers]
    activate_only(model, name)
    try:
        yield
    finally:
        for layer, active in zip(layers, before, strict=True):
            layer._active_adapter = active


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class LoraPolicy(nn.Module):
    """Holds the adapted backbone; its state dict is the policy adapter's weights alone."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        full = self.backbone.state_dict()
        return {k: v for k, v in full.items() if is_policy_weight(k)}

    def load_state_dict(self, state: dict[str, Tensor], strict: bool = True, assign: bool = False):  # type: ignore[override]
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if strict and (missing or unexpected):
            bad = (missing or unexpected)[0]
            raise RuntimeError(
                f"LoRA weights do not match the model: {len(missing)} missing, "
                f"{len(unexpected)} unexpected (e.g. {bad!r})"
            )
        return self.backbone.load_state_dict(state, strict=False)


def enable_adapter_aware_checkpointing(model: nn.Module) -> None:
    """Gradient checkpointing for a diffusers model whose adapters are switched within a loss
    (the reference is the model with its adapter off, an LCM-LoRA another adapter).

    A checkpointed block is run again during backward, after the switch has been undone;
    it must see the adapters as its forward saw them, or it computes a different function.
    Each block's adapter state is recorded at forward time and put back for its recompute.
    """
    from torch.utils.checkpoint import checkpoint

    def run(block: nn.Module, *args: Any) -> Any:
        layers = [m for m in block.modules() if isinstance(m, BaseTunerLayer)]
        as_in_forward = _AdapterStateAsRecorded(layers)
        return checkpoint(
            block.__call__, *args, use_reentrant=False,
            context_fn=lambda: (nullcontext(), as_in_forward),
        )  # fmt: skip

    model.enable_gradient_checkpointing(run)


class _AdapterStateAsRecorded:
    """Puts ``layers``' adapter state back as it was at construction for the span of a
    ``with``, then restores what it found. Re-enterable: a block whose graph is backpropagated
    twice (a vector-Jacobian product with retain_graph, then the loss) is recomputed twice
    under the same context object, which a generator-based context manager cannot do."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        self.seen = [(m._disable_adapters, m._active_adapter) for m in layers]
        self.found: list[list[tuple[Any, Any]]] = []

    def __enter__(self) -> None:
        self.found.append([(m._disable_adapters, m._active_adapter) for m in self.layers])
        for m, (disabled, active) in zip(self.layers, self.seen, strict=True):
            m._disable_adapters, m._active_adapter = disabled, active

    def __exit__(self, *exc: object) -> None:
        for m, (disabled, active) in zip(self.layers, self.found.pop(), strict=True):
            m._disable_adapters, m._active_adapter = disabled, active
