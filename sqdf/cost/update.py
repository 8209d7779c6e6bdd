"""One SQDF update's FLOPs by phase and its traced GPU memory, per design, on meta tensors.

Three traces of the sd task's own calls (sqdf.cost.parts) at the run's micro-batch B:
one sampling step (the policy with CFG, no gradients), the scoring of fresh samples (VAE
decode and reward, no gradients), and one gradient micro-batch laid out as
``sqdf.methods.sqdf.sqdf_loss`` runs it: the policy's step with gradients, the reference's
step, the x̂0 model on the state reached, the VAE decode, the reward, then the backward.
An update is composed from them by its design (every FLOP count is linear in the batch):

- reference: the official SQDF trainer's budget (Shin-woocheol/SQDF
  T2I/alignprop_trainer.py, get_on_policy_data, lines 810-830: train_batch_size x
  train_gradient_accumulation_steps fresh trajectories per process; docs/reproducing.md,
  row 1): B x grad_accum whole trajectories sampled and scored every update, then
  grad_accum micro-batches of B cells (at grad_accum 1, sqdf's rollout full, buffer
  on_policy, replay ratio 1);
- truncated: per micro-batch, B trajectories run only to the step their cell uses
  (E[max of m distinct steps of T] sampling steps each for m cells a trajectory);
- replay<N>: sqdf's trainer with full rollouts: the run's ``fresh_count`` whole trajectories
  (fresh_trajectories, else B) into the buffer every N updates, then grad_accum
  micro-batches of B cells drawn from it.

Memory is the peak of live tensors over the three traces, plus the optimizer's float32
state of the LoRA; the replay buffer lives in host memory (sqdf.training.dry_run.buffer_bytes).
Everything here is a traced estimate, not a measurement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from sqdf.config.train_config import TrainConfig
from sqdf.cost.parts import (
    MetaParts,
    linear_weight_bytes,
    made_on_meta,
    trainable_state_bytes,
    weight_bytes,
)
from sqdf.cost.trace import UpdateTracer, fused_attention
from sqdf.errors import SqdfError
from sqdf.sampling.sampler import step_mean_std

TRACED_ESTIMATORS = ("tweedie", "consistency")  # the x̂0 of one network call
GRADIENT_PHASES = ("policy step", "reference step", "x̂0 model", "VAE decode", "reward", "backward")
PHASES = ("sampling", "scoring fresh", *GRADIENT_PHASES)
BLIND_SPOTS = (
    "traced on meta tensors, not measured: the peak of live tensors at the run's dtypes, "
    "with attention as a GPU's fused kernel holds it; not seen: the CUDA context (about "
    "0.5 GiB), allocator rounding and fragmentation, cuDNN and attention workspaces, NCCL "
    "buffers"
)


def design_settings(name: str) -> dict | None:
    """The training settings of a design: reference, truncated, truncated_x<M> (M steps per
    trajectory) or replay<N> (N updates per fresh batch); None for an unknown name."""
    if name == "reference":
        return {"rollout": "full", "buffer": "on_policy", "replay_ratio": 1}
    if name == "truncated":
        name = "truncated_x1"
    if m := re.fullmatch(r"truncated_x([1-9]\d*)", name):
        return {"rollout": "truncated", "buffer": "on_policy", "replay_ratio": 1,
                "cells_per_trajectory": int(m[1])}  # fmt: skip
    if m := re.fullmatch(r"replay([1-9]\d*)", name):
        return {"rollout": "full", "buffer": "prioritized", "replay_ratio": int(m[1])}
    return None


@dataclass
class Traces:
    """FLOPs by phase of one sampling step, one scoring and one gradient micro-batch at
    ``batch`` samples (cells), and the traced bytes."""

    batch: int
    flops: dict[str, int]
    peak: int  # most live bytes at once, over the three traces (without trainable state)
    phase_peak: dict[str, int]
    weights: int  # the frozen networks' weights (and the LoRA) held throughout
    state: int  # float32 LoRA, its gradient and AdamW's moments
    text_encoders: int  # weights of the text encoders, held while prompts are encoded
    parts: dict[str, int] = field(default_factory=dict)  # weight bytes by network
    denoiser_linear: int = 0  # bytes of the denoiser's frozen Linear weights


def trace_update(meta: MetaParts, cfg: TrainConfig, batch: int, step: int = 0) -> Traces:
    """Trace the three pieces of an update at ``batch`` samples, the gradient's cells at step
    ``step`` (any but the last runs the x̂0 model)."""
    task = meta.task
    if task.estimator not in TRACED_ESTIMATORS:
        raise SqdfError(
            f"the cost trace follows estimators {' and '.join(TRACED_ESTIMATORS)}, not "
            f"{task.estimator!r}"
        )
    tracer = UpdateTracer()
    networks = list(meta.networks.values())
    tracer.hold([t for m in networks for t in (*m.parameters(), *m.buffers())])
    with made_on_meta(task.dtype):
        text = [t for t in vars(task.text).values() if isinstance(t, torch.Tensor)]
    tracer.hold(text)
    gen = torch.Generator().manual_seed(0)
    shape = (batch, *task.sample_shape)
    cond = torch.zeros(batch, dtype=torch.long, device="meta")
    k = torch.full((batch,), step, dtype=torch.long)
    task.prompts = [""]
    with tracer, fused_attention():
        x = torch.zeros(shape, device="meta")
        with torch.no_grad(), tracer.phase("sampling"):
            mean, std = step_mean_std(task, x, k, cond, policy=True)
            x_next = mean + std * torch.zeros_like(mean)
        del mean, std, x_next
        with torch.no_grad(), tracer.phase("scoring fresh"):
            rewards = task.reward_model(task.reward_input(x), [""] * batch).float()
        del rewards
        _gradient_micro_batch(task, cfg, tracer, x, k, cond, gen)
    weights = weight_bytes(networks)
    parts = {role: weight_bytes([m]) for role, m in meta.networks.items()}
    return Traces(
        batch=batch, flops=dict(tracer.flops), peak=tracer.peak,
        phase_peak=dict(tracer.phase_peak), weights=weights,
        state=trainable_state_bytes(meta.trainable), text_encoders=meta.text_encoder_bytes,
        parts=parts, denoiser_linear=linear_weight_bytes(task.denoiser),
    )  # fmt: skip


def _gradient_micro_batch(task, cfg, tracer, x_t, k, cond, gen) -> None:  # noqa: ANN001
    """sqdf_loss's calls in its order, each in its phase, then the backward (its ``.item()``
    statistics are left out: meta tensors hold no values)."""
    with tracer.phase("policy step"):
        mean, std = step_mean_std(task, x_t, k, cond, policy=True)
    with torch.no_grad(), tracer.phase("reference step"):
        ref_mean, _ = step_mean_std(task, x_t, k, cond, policy=False)
    z = torch.zeros_like(mean)
    x_prev = mean + std * z
    # task.x0_after_step's estimator call for state k + 1 (its final torch.where picks
    # between values, which meta tensors do not hold)
    state = (k + 1).clamp(max=task.kernel.num_steps - 1)
    with tracer.phase("x̂0 model"):
        if task.estimator == "consistency":
            # the model times on the CPU, where the task reads its schedule from them
            x0 = task.consistency_x0(x_prev, task.kernel.model_time(state), cond)
        else:
            x0 = task.reference_x0(x_prev, state, cond)
    with tracer.phase("VAE decode"):
        images = task.reward_input(x0)
    with tracer.phase("reward"):
        reward = task.reward_model(images, [""] * len(x_t)).float()
    # gaussian_kl and soft_q_loss as arithmetic: their checks read values (std > 0), which
    # meta tensors do not hold; the discount is a per-cell factor, the same graph
    kl = ((mean - ref_mean) ** 2 / (2 * std**2)).flatten(1).sum(1)
    loss = (cfg.alpha * kl - reward).mean()
    del mean, ref_mean, std, z, x_prev, x0, images, reward, kl
    with tracer.phase("backward"):
        loss.backward()
    del loss
    for p in task.denoiser.parameters():  # zero_grad(set_to_none): before the next micro-batch
        p.grad = None


def expected_steps(num_steps: int, cells: int) -> float:
    """Sampling steps a truncated trajectory runs: the largest of ``cells`` distinct steps
    drawn uniformly from 0..T-1, in expectation (m (T + 1) / (m + 1) - 1)."""
    return cells * (num_steps + 1) / (cells + 1) - 1


def update_flops(traces: Traces, cfg: TrainConfig, design: str) -> dict[str, float]:
    """FLOPs of one update of ``design`` by phase, from traces at the run's batch."""
    settings = design_settings(design)
    if settings is None:
        raise ValueError(f"unknown design {design!r}")
    per = {name: traces.flops.get(name, 0) / traces.batch for name in PHASES}  # per sample
    b, T = cfg.batch_size, cfg.num_steps
    m = settings.get("cells_per_trajectory", 1)
    if settings["rollout"] == "truncated":
        sampled = cfg.grad_accum * b * expected_steps(T, m)
        scored = 0.0
        cells = cfg.grad_accum * b * m
    else:
        # the official budget: B x grad_accum trajectories an update; sqdf's trainer samples
        # the run's fresh_count (fresh_trajectories, else the batch) every N updates
        if design == "reference":
            fresh = b * cfg.grad_accum
        else:
            fresh = cfg.fresh_count / settings["replay_ratio"]
        sampled, scored = fresh * T, fresh
        cells = cfg.grad_accum * b
    out = {"sampling": per["sampling"] * sampled, "scoring fresh": per["scoring fresh"] * scored}
    out |= {name: per[name] * cells for name in GRADIENT_PHASES}
    return out


def run_design(cfg: TrainConfig) -> str:
    """The design name of a run's own settings."""
    if cfg.rollout == "truncated":
        m = cfg.cells_per_trajectory
        return "truncated" if m == 1 else f"truncated_x{m}"
    return f"replay{cfg.replay_ratio}"


def gpu_peak(traces: Traces) -> int:
    """Traced peak bytes on the GPU: the live tensors' peak plus the optimizer's state."""
    return traces.peak + traces.state


def prompt_encoding_peak(traces: Traces) -> int:
    """Bytes while the prompts are encoded: the sd task encodes them before it loads the
    denoiser and the VAE, holding every text encoder at once (their activations, for a few
    prompts, left out)."""
    return traces.text_encoders
