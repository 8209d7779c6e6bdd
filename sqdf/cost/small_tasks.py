"""The cost of an update on the small tasks (gmm2d, digits): their own networks, built on the
CPU as a run builds them (no download: both ship or make their models), traced with the same
counter as the sd task's (:class:`sqdf.cost.trace.UpdateTracer`) through one sampling step,
the scoring of a fresh batch, and the method's own loss on a micro-batch of cells with its
backward. Real tensors, so the loss itself runs (its ``.item()`` statistics too): what is
counted is what a run computes, in float32 (the small tasks' dtype on any device)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from sqdf.config.train_config import TrainConfig
from sqdf.cost.parts import trainable_state_bytes, weight_bytes
from sqdf.cost.trace import UpdateTracer
from sqdf.cost.update import Traces, gpu_peak, run_design, update_flops
from sqdf.sampling.buffer import Cells
from sqdf.sampling.sampler import step_mean_std

SMALL_PHASES = ("sampling", "scoring fresh", "loss", "backward")


def _modules(task: Any) -> dict[str, nn.Module]:
    """Every network the task holds (policy, reference, reward) by its attribute's name."""
    found = {name: v for name, v in vars(task).items() if isinstance(v, nn.Module)}
    reward = getattr(task, "reward_model", None)
    if isinstance(reward, nn.Module):
        found["reward"] = reward
    return found


def _part_bytes(modules: dict[str, nn.Module]) -> dict[str, int]:
    """Weight bytes by network, each tensor charged to the first network holding it (a LoRA
    policy wraps the base it shares with the reference)."""
    seen: set[int] = set()
    out = {}
    for name, m in modules.items():
        tensors = [t for t in (*m.parameters(), *m.buffers()) if id(t) not in seen]
        seen.update(id(t) for t in tensors)
        if tensors:
            out[name] = sum(t.numel() * t.element_size() for t in tensors)
    return out


RANDOM_CHAIN = ("alignprop", "refl")  # methods whose loss draws how many steps it runs


def trace_small(cfg: TrainConfig) -> Traces:
    """FLOPs by phase (sampling, scoring fresh, the method's loss, its backward) of one
    sampling step, one scoring and one gradient micro-batch at the run's micro-batch, and the
    peak of live tensors over them."""
    from sqdf.methods import METHODS, build_method_params
    from sqdf.tasks import build_task

    cfg = dataclasses.replace(cfg, device="cpu")
    task = build_task(cfg)
    method = METHODS[cfg.method]
    params = build_method_params(cfg.method, cfg.method_params)
    batch = cfg.batch_size * cfg.cells_per_trajectory
    gen = torch.Generator().manual_seed(0)
    tracer = UpdateTracer()
    modules = list(_modules(task).values())
    tracer.hold([t for m in modules for t in (*m.parameters(), *m.buffers())])
    T = task.kernel.num_steps
    with tracer:
        cond = task.sample_conditions(batch, gen)
        x = torch.randn((batch, *task.sample_shape), generator=gen)
        k = torch.randint(0, T, (batch,), generator=gen)
        with torch.no_grad(), tracer.phase("sampling"):
            mean, std = step_mean_std(task, x, k, cond, policy=True)
            x_next = mean + std * torch.randn(mean.shape, generator=gen)
        with torch.no_grad(), tracer.phase("scoring fresh"):
            reward = task.reward(x_next, cond)
        logp = task.kernel.log_prob(x_next, mean, std) if method.likelihood_ratio else None
        cells = Cells(x_t=x, x_next=x_next, step=k, cond=cond, reward=reward.detach(),
                      index=torch.arange(batch), logp=logp)  # fmt: skip
        del mean, std
        extra: dict[str, Any] = {}
        if method.grouped:  # each cell's group within the newest batch: the cells themselves
            group = torch.arange(batch) // params.group_size
            extra = {"group": group, "batch_reward": cells.reward, "batch_group": group}
        with tracer.phase("loss"):
            loss, _ = method.loss(task, cells, cfg, params, gen, **extra)
        with tracer.phase("backward"):
            loss.backward()
        del loss
    trainable = sum(p.numel() for p in task.policy.parameters() if p.requires_grad)
    return Traces(
        batch=batch, flops={p: tracer.flops.get(p, 0) for p in SMALL_PHASES},
        peak=tracer.peak, phase_peak=dict(tracer.phase_peak), weights=weight_bytes(modules),
        state=trainable_state_bytes(trainable), text_encoders=0,
        parts=_part_bytes(_modules(task)), method=cfg.method,
    )  # fmt: skip


def small_task_lines(cfg: TrainConfig, gpu_memory: int | None) -> list[str]:
    """The dry run's cost section for gmm2d and digits."""
    from sqdf.cost.memory import fits, gib, headroom

    traces = trace_small(cfg)
    design = run_design(cfg)
    flops = update_flops(traces, cfg, design)
    lines = [
        f"cost of one update (traced estimates, not measurements; task {cfg.task}, method "
        f"{cfg.method}, float32, the task's own networks and loss traced on the CPU):",
        f"  FLOPs by phase        this run ({design})",
    ]
    for phase in SMALL_PHASES:
        lines.append(f"    {phase:<22} {flops[phase] / 1e9:>12.3f} GFLOP")
    lines.append(f"    {'total':<22} {sum(flops.values()) / 1e9:>12.3f} GFLOP")
    peak = gpu_peak(traces)
    parts = ", ".join(f"{role} {gib(n)}" for role, n in traces.parts.items())
    lines += [
        f"  traced memory (micro-batch {traces.batch} cells):",
        f"    weights: {parts}",
        f"    trainable weights in float32 with their gradients and AdamW moments: "
        f"{gib(traces.state)}",
        f"    peak of one update: {gib(peak)} (live tensors {gib(traces.peak)} + optimizer "
        "state); by phase: "
        + ", ".join(f"{p} {gib(traces.phase_peak.get(p, 0))}" for p in SMALL_PHASES),
    ]
    if cfg.method in RANDOM_CHAIN:
        # the loss is traced as it runs, once: its chain length is the one drawn here
        lines.append(
            f"  note: {cfg.method} draws its chain's length at random each update; this is one "
            "draw (generator seed 0), neither the mean nor the largest"
        )
    if gpu_memory is None:
        lines.append("  fit: no --gpu-memory given and no GPU detected")
        return lines
    room = f"traced peak {gib(peak)} + headroom {gib(headroom(peak))}"
    verdict = "fits" if fits(peak, gpu_memory) else "does not fit"
    lines.append(f"  fit: {verdict} {gib(gpu_memory)} ({room})")
    return lines
