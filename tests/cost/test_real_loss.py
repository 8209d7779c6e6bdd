"""The tracer against a real run: one gradient micro-batch of sqdf's own loss on a tiny
random SD with real weights on the CPU, counted with FlopCounterMode, against the trace of
the same run's configs on meta tensors (sqdf.cost.update's copy of the loss's calls)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sqdf.cost.report import trace_run
from sqdf.cost.update import GRADIENT_PHASES
from sqdf.methods.sqdf import SqdfParams, sqdf_loss
from sqdf.sampling.buffer import Cells
from sqdf.tasks import build_task
from tests.tasks.sd_runs import sd_config, write_tiny_parts


@pytest.mark.xfail(
    strict=True,
    reason="the trace's copy of the loss overcounts the real one on this tiny SD: forward "
    "2,454,481,984 traced against 2,025,400,896 counted (the x̂0 phase about twice the real "
    "call's), backward 3,203,266,112 against 2,192,117,568; open until the trace calls the "
    "task's own loss",
)
def test_traced_gradient_flops_equal_the_real_loss_and_backward(tmp_path):
    parts = write_tiny_parts(tmp_path)
    cfg = sd_config(parts / "sd", parts, reward="aesthetic", task_params={"resolution": 32})
    task = build_task(cfg)
    b = cfg.batch_size
    cells = Cells(
        x_t=torch.randn(b, *task.sample_shape, generator=torch.Generator().manual_seed(0)),
        x_next=None, step=torch.zeros(b, dtype=torch.long), cond=torch.zeros(b, dtype=torch.long),
        reward=torch.zeros(b), index=torch.arange(b),
    )  # fmt: skip
    with FlopCounterMode(display=False) as counter:
        loss, _ = sqdf_loss(task, cells, cfg, SqdfParams(), torch.Generator().manual_seed(1))
        loss.backward()
    real = counter.get_total_flops()
    traces = trace_run(cfg, on_gpu=False, step=0)
    traced = sum(traces.flops.get(p, 0) for p in GRADIENT_PHASES)
    assert real > 0
    assert traced == real, (traced, real, traces.flops)
