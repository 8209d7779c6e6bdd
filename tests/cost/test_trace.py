"""The tracer against closed forms: FLOPs of a linear layer, a convolution and attention
(2 FLOPs a multiply-add, as torch.utils.flop_counter counts), and live-memory peaks against
the sum of the tensors' sizes, worked out by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sqdf.cost.trace import UpdateTracer, fused_attention

META = torch.device("meta")


def test_linear_forward_and_backward_flops():
    b, n_in, n_out = 8, 64, 32
    lin = torch.nn.Linear(n_in, n_out, device=META)
    x = torch.randn(b, n_in, device=META, requires_grad=True)
    tracer = UpdateTracer()
    with tracer:
        with tracer.phase("forward"):
            y = lin(x)
        with tracer.phase("backward"):
            y.sum().backward()
    assert tracer.flops["forward"] == 2 * b * n_in * n_out
    # the input's gradient and the weight's: two products of the same size
    assert tracer.flops["backward"] == 2 * (2 * b * n_in * n_out)


def test_frozen_linear_backward_counts_the_input_gradient_only():
    lin = torch.nn.Linear(64, 32, device=META).requires_grad_(False)
    x = torch.randn(8, 64, device=META, requires_grad=True)
    tracer = UpdateTracer()
    with tracer:
        y = lin(x)
        with tracer.phase("backward"):
            y.sum().backward()
    assert tracer.flops["backward"] == 2 * 8 * 64 * 32


def test_convolution_flops():
    b, c_in, c_out, side, k = 2, 8, 16, 12, 3
    conv = torch.nn.Conv2d(c_in, c_out, k, padding=1, device=META)
    x = torch.randn(b, c_in, side, side, device=META)
    tracer = UpdateTracer()
    with tracer, tracer.phase("conv"):
        conv(x)
    assert tracer.flops["conv"] == 2 * b * c_out * side * side * c_in * k * k


def test_attention_flops_and_no_attention_matrix():
    b, h, lq, lk, d = 2, 4, 1024, 77, 64
    q = torch.randn(b, h, lq, d, device=META, dtype=torch.bfloat16)
    kv = torch.randn(b, h, lk, d, device=META, dtype=torch.bfloat16)
    tracer = UpdateTracer()
    with tracer, fused_attention(), tracer.phase("attention"):
        out = F.scaled_dot_product_attention(q, kv, kv)
    # Q K^T and (softmax) V: two products of b h lq lk d multiply-adds
    assert tracer.flops["attention"] == 4 * b * h * lq * lk * d
    # the output (bf16) and the log-sum-exp rows (float32): never the lq x lk matrix
    assert tracer.peak <= out.numel() * 2 + b * h * lq * 4 + 64
    math_path = UpdateTracer()
    with math_path:
        F.scaled_dot_product_attention(q, kv, kv)
    assert math_path.peak >= b * h * lq * lk * 2  # what the meta math path holds


def test_fused_attention_takes_masks_and_gives_gradients_of_the_math_path_shapes():
    q = torch.randn(2, 4, 16, 8, device=META, requires_grad=True)
    kv = torch.randn(2, 4, 10, 8, device=META, requires_grad=True)
    mask = torch.ones(16, 10, dtype=torch.bool, device=META)
    with fused_attention():
        out = F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask)
        grads = torch.autograd.grad(out.sum(), (q, kv))
    assert out.shape == F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask).shape
    assert [g.shape for g in grads] == [q.shape, kv.shape]


def test_fused_attention_leaves_real_tensors_to_torch():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)
    with fused_attention():
        out = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_peak_is_the_largest_sum_of_live_tensors():
    held = torch.empty(1000, device=META)  # 4000 bytes, made before the trace
    tracer = UpdateTracer()
    tracer.hold([held])
    with tracer:
        a = torch.empty(500, device=META) + 1  # 2000 bytes
        view = a[:100]  # shares a's storage: nothing new
        b = torch.zeros(250, device=META, dtype=torch.float64)  # 2000 bytes
        del a
        assert tracer.live == 4000 + 2000 + 2000  # the view keeps a's storage alive
        del view
        assert tracer.live == 4000 + 2000
        c = torch.ones(3000, device=META, dtype=torch.bfloat16)  # 6000 bytes
    assert tracer.peak == 4000 + 2000 + 6000
    del b, c
    assert tracer.live == 4000


def test_peak_of_a_backward_matches_the_cpu_storages_it_keeps():
    """On the CPU the same trace sees real tensors: the peak of an MLP's forward and
    backward equals the storages worked out from what autograd saves."""
    torch.manual_seed(0)
    b, w = 16, 32
    l1, l2 = torch.nn.Linear(w, 4 * w), torch.nn.Linear(4 * w, 1)
    x = torch.randn(b, w)
    tracer = UpdateTracer()
    params = [*l1.parameters(), *l2.parameters()]
    tracer.hold([*params, x])
    with tracer:
        loss = l2(torch.relu(l1(x))).sum()
        forward_live = tracer.live
        loss.backward()
    weights = sum(p.numel() * 4 for p in params)
    # relu's output (what relu's backward and l2 save; l1's output and l2's are freed once
    # used, as neither backward needs them) and the loss
    assert forward_live == weights + x.numel() * 4 + b * 4 * w * 4 + 4
    assert tracer.live >= weights * 2  # every parameter has its gradient now
    assert tracer.peak >= forward_live


def test_phases_sum_to_flop_counter_mode_total():
    conv = torch.nn.Conv2d(4, 8, 3, device=META)
    lin = torch.nn.Linear(8 * 6 * 6, 10, device=META)
    x = torch.randn(2, 4, 8, 8, device=META, requires_grad=True)
    tracer = UpdateTracer()
    with FlopCounterMode(display=False) as counter, tracer:
        with tracer.phase("a"):
            y = conv(x).flatten(1)
        with tracer.phase("b"):
            z = lin(y).sum()
        z.backward()
    assert sum(tracer.flops.values()) == counter.get_total_flops() > 0
