"""FLOPs by phase and the peak of live tensor memory, traced through torch's dispatcher.

Every op that reaches the dispatcher while :class:`UpdateTracer` is active is counted with
the formulas of ``torch.utils.flop_counter`` (matrix products, convolutions, attention:
the ops that dominate a diffusion model's work; elementwise ops are not counted, as
FlopCounterMode counts none) and charged to the innermost phase open at the time. Each
tensor storage an op creates is added to the live total until Python frees it, so the
peak is that of the tensors the program holds, at their dtypes: weights, activations saved
for backward, gradients. What it cannot see: the CUDA allocator's rounding and
fragmentation, cuDNN and attention workspaces, NCCL buffers and the CUDA context.

On the meta device ``scaled_dot_product_attention`` decomposes into its math path and
materialises the (L, S) attention matrix, which a GPU's fused kernels never hold;
:func:`fused_attention` sends it to the memory-efficient kernel instead (its meta kernel
gives the output and the log-sum-exp rows only), the one a GPU runs for these shapes.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

from sqdf.tasks.quantize import inner_tensors


class UpdateTracer(TorchDispatchMode):
    """FLOPs per phase and live storage bytes (current, peak overall and per phase).

    ``hold`` adds tensors that exist before the trace (weights, buffers) to the live total;
    ``phase(name)`` charges the ops inside to ``name`` (nested phases: the innermost)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops: dict[str, int] = defaultdict(int)
        self.phase_peak: dict[str, int] = defaultdict(int)
        self.live = 0
        self.peak = 0
        self._stack: list[str] = ["other"]
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def _add(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[storage] = nbytes
        self.live += nbytes
        weakref.finalize(storage, self._free, nbytes)
        self._note_peak()

    def _note_peak(self) -> None:
        self.peak = max(self.peak, self.live)
        name = self._stack[-1]
        self.phase_peak[name] = max(self.phase_peak[name], self.live)

    def hold(self, tensors: Any) -> None:
        """Count tensors made before the trace (a module's parameters and buffers; a quantised
        weight by the int8 data and scales it holds, not its nominal dtype)."""
        for t in tensors:
            for inner in inner_tensors(t):
                self._add(inner)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._stack.append(name)
        self._note_peak()  # what is live on entering counts toward the phase's peak
        try:
            yield
        finally:
            self._stack.pop()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        counter = flop_registry.get(func._overloadpacket)
        if counter is not None:
            self.flops[self._stack[-1]] += int(counter(*args, **kwargs, out_val=out))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._add(t)
        return out


_ORIGINAL_SDPA = F.scaled_dot_product_attention


def _efficient_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """scaled_dot_product_attention through the memory-efficient kernel: O(L) extra memory
    (the log-sum-exp rows kept for backward), not the (L, S) matrix of the math path. For
    meta tensors only: the kernel has no CPU implementation, and real tensors run as usual."""
    if query.device.type != "meta":
        return _ORIGINAL_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                              enable_gqa=enable_gqa)  # fmt: skip
    if enable_gqa and key.shape[-3] != query.shape[-3]:  # grouped heads: repeat, as the math path
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
        attn_mask = bias.masked_fill(~attn_mask, float("-inf"))
    if attn_mask is not None:  # the kernel wants the bias at its full (B, H, L, S) shape
        shape = (*query.shape[:-1], key.shape[-2])
        attn_mask = attn_mask.expand(shape)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, grad, dropout_p, is_causal, scale=scale
    )
    return out[0]


@contextmanager
def fused_attention() -> Iterator[None]:
    """Inside, scaled_dot_product_attention runs as a GPU's fused kernel would hold memory.

    The function is replaced on torch.nn.functional itself (diffusers and transformers look
    it up there at each call) rather than by a TorchFunctionMode, whose stack the autograd
    engine's thread does not see when gradient checkpointing recomputes a block."""
    F.scaled_dot_product_attention = _efficient_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _ORIGINAL_SDPA
