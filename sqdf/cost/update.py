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

The other methods' gradient micro-batch is traced as their loss makes its calls
(:func:`method_micro_batch`): DDPO and GRPO (a policy-ratio loss: the policy's step with
gradients and the reference's without, on stored cells; no reward, x̂0 or decode: the
reward was read when the batch was scored), and the reward-gradient baselines that run their
own chain (DRaFT-K, DRaFT+KL, DRaFT-LV, AlignProp, ReFL: the chain's steps without gradients,
charged to "chain without gradient" at the traced sampling step's count, then the steps with
gradients, the decode and the reward, and the backward through them). A number of steps drawn
at random each update (AlignProp's truncation, ReFL's step) is counted in expectation, its
memory at the largest draw.

Memory is the peak of live tensors over the traces, plus the optimizer's float32
state of the LoRA; the replay buffer lives in host memory (sqdf.training.dry_run.buffer_bytes).
Everything here is a traced estimate, not a measurement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from sqdf.config.train_config import TrainConfig
from sqdf.core.kl import gaussian_log_prob
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
PHASES = ("sampling", "scoring fresh", *GRADIENT_PHASES)  # SQDF's update
CHAIN = "chain without gradient"  # a baseline's own chain, run before its steps with gradients
# every phase a trace charges, in the order an update runs them ("loss": a small task's whole
# loss, traced as one call)
ALL_PHASES = ("sampling", "scoring fresh", CHAIN, *GRADIENT_PHASES[:-1], "loss", "backward")
RATIO_METHODS = ("ddpo", "grpo")  # a policy-ratio loss on stored cells
CHAIN_METHODS = ("draft", "draft_kl", "draft_lv", "alignprop", "refl")  # own chain, reward grad
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
    method: str = "sqdf"
    note: str | None = None  # how a method's random draw was counted

    def phases(self) -> tuple[str, ...]:
        """The phases this method's update runs, in the order they run."""
        return tuple(p for p in ALL_PHASES if p in self.flops)


def trace_update(meta: MetaParts, cfg: TrainConfig, batch: int, step: int = 0) -> Traces:
    """Trace the three pieces of an update at ``batch`` samples, the gradient's cells at step
    ``step`` (any but the last runs the x̂0 model); for a method other than sqdf its own
    gradient micro-batch (:func:`method_micro_batch`)."""
    task = meta.task
    if cfg.method not in ("sqdf", *RATIO_METHODS, *CHAIN_METHODS):
        raise SqdfError(f"the cost trace has no update for method {cfg.method!r}")
    if cfg.method == "sqdf" and task.estimator not in TRACED_ESTIMATORS:
        raise SqdfError(
            f"the cost trace follows estimators {' and '.join(TRACED_ESTIMATORS)}, not "
            f"{task.estimator!r}"
        )
    tracer = UpdateTracer()
    networks = list(meta.networks.values())
    tracer.hold([t for m in networks for t in (*m.parameters(), *m.buffers())])
    with made_on_meta(task.dtype):
        held = [task.text] + ([task.distilled_text] if task.distilled_text is not None else [])
        text = [t for c in held for t in vars(c).values() if isinstance(t, torch.Tensor)]
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
        if cfg.method == "sqdf":
            _gradient_micro_batch(task, cfg, tracer, x, k, cond, gen)
            flops, peak, note = dict(tracer.flops), tracer.peak, None
            phase_peak = dict(tracer.phase_peak)
        else:
            flops, peak, phase_peak, note = method_micro_batch(task, cfg, x, cond, tracer)
    weights = weight_bytes(networks)
    parts = {role: weight_bytes([m]) for role, m in meta.networks.items()}
    return Traces(
        batch=batch, flops=flops, peak=peak, phase_peak=phase_peak, weights=weights,
        state=trainable_state_bytes(meta.trainable), text_encoders=meta.text_encoder_bytes,
        parts=parts, denoiser_linear=linear_weight_bytes(task.denoiser), method=cfg.method,
        note=note,
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


def _traced(tracer: UpdateTracer, run) -> tuple[dict[str, float], int, dict[str, int]]:  # noqa: ANN001
    """FLOPs by phase, the peak and the phases' peaks of ``run(tracer)`` alone: the tracer's
    counts before it are set aside (its live bytes, the weights, stay counted)."""
    flops_before, peak_before = dict(tracer.flops), tracer.peak
    phase_before = dict(tracer.phase_peak)
    tracer.peak = tracer.live
    tracer.phase_peak.clear()
    run(tracer)
    flops = {p: v - flops_before.get(p, 0) for p, v in tracer.flops.items()
             if v != flops_before.get(p, 0)}  # fmt: skip
    out = (flops, tracer.peak, dict(tracer.phase_peak))
    tracer.peak = max(peak_before, tracer.peak)
    for p, v in phase_before.items():
        tracer.phase_peak[p] = max(tracer.phase_peak[p], v)
    return out


def method_micro_batch(
    task,
    cfg: TrainConfig,
    x_t,
    cond,
    tracer: UpdateTracer,  # noqa: ANN001
) -> tuple[dict[str, float], int, dict[str, int], str | None]:
    """A baseline's gradient micro-batch at the batch of ``x_t``: FLOPs by phase (sampling and
    scoring fresh from ``tracer``, which traced them), the peak over every trace, the phases'
    peaks, and a note on how a random draw was counted (None without one)."""
    from sqdf.methods import build_method_params

    params = build_method_params(cfg.method, cfg.method_params)
    T = task.kernel.num_steps
    step_flops = tracer.flops.get("sampling", 0)  # one no-grad policy step at this batch
    base = {p: tracer.flops.get(p, 0) for p in ("sampling", "scoring fresh")}
    peaks = [tracer.peak]
    phase_peak = {p: tracer.phase_peak.get(p, 0) for p in ("sampling", "scoring fresh")}
    sampling_peak = phase_peak["sampling"]

    def run_all(variants: list[tuple[float, dict]]) -> dict[str, float]:
        # weighted sum of the traced variants' FLOPs (weights: probabilities, or the
        # coefficients of a line through two traces)
        out: dict[str, float] = {}
        for weight, kw in variants:
            flops, peak, pp = _traced(
                tracer, lambda t, kw=kw: _micro(task, cfg, params, x_t, cond, t, **kw)
            )
            peaks.append(peak)
            for p, v in pp.items():
                phase_peak[p] = max(phase_peak.get(p, 0), v)
            for p, v in flops.items():
                out[p] = out.get(p, 0.0) + weight * v
        return out

    note = None
    if cfg.method in RATIO_METHODS:
        grad = run_all([(1.0, {})])
        chain = None
    elif cfg.method in ("draft", "draft_kl"):
        k = min(params.k, T)
        grad, chain = _steps_line(run_all, k, k, peaks, phase_peak), T - k
        if k > 2:
            note = (f"DRaFT's {k} steps with gradients: FLOPs and memory on the line through "
                    "traces at 1 and 2 steps (each step holds the same tensors; the peaks by "
                    "phase are the trace's at 2)")  # fmt: skip
    elif cfg.method == "draft_lv":
        grad, chain = run_all([(1.0, {"branches": params.lv_samples})]), T
    elif cfg.method == "alignprop":
        hi = min(params.k_max or T, T)
        lo = min(params.k_min, hi)
        mean_k = (lo + hi) / 2
        grad, chain = _steps_line(run_all, mean_k, hi, peaks, phase_peak), T - mean_k
        lined = (
            ", both on the line through traces at k = 1 and 2 (each step holds the same "
            "tensors; the peaks by phase are the trace's at 2)"
        )
        note = (
            f"AlignProp draws its truncation k uniformly from {lo}..{hi} each update: FLOPs "
            f"at the mean k = {mean_k:g}, memory at k = {hi}" + (lined if hi > 2 else "")
        )
    else:  # refl: a step k drawn from lo..T-1; below T-1 the policy's x̂0 pass follows
        lo = min(int(params.min_frac * T), T - 1)
        with_x0 = (T - 1 - lo) / (T - lo)
        variants = [(w, {"x0_pass": x0}) for w, x0 in ((with_x0, True), (1 - with_x0, False))
                    if w > 0]  # fmt: skip
        grad, chain = run_all(variants), (lo + T - 1) / 2
        note = f"ReFL draws its gradient step k uniformly from {lo}..{T - 1}: FLOPs in expectation"
        if with_x0:
            note += f" ({with_x0:.0%} of draws add the policy's x̂0 pass), memory with that pass"
    flops: dict[str, float] = {**base}
    if chain is not None:
        flops[CHAIN] = step_flops * chain
        phase_peak[CHAIN] = sampling_peak  # the same no-grad step, one at a time
    flops |= grad
    flops.pop("other", None)
    return flops, max(peaks), phase_peak, note


def _steps_line(run_all, mean_k: float, max_k: int, peaks: list[int], phase_peak) -> dict:  # noqa: ANN001
    """A chain method's micro-batch with ``mean_k`` steps with gradients in FLOPs and
    ``max_k`` in memory: traced at that count where it is 1 or 2, else on the line through
    traces at 1 and 2 steps (every step with gradients runs the same calls on tensors of the
    same shapes, so FLOPs are exactly affine in the count and the saved tensors grow by one
    step's at each)."""
    if max_k <= 2 and mean_k == max_k:
        return run_all([(1.0, {"grad_steps": max_k})])
    start = len(peaks)
    one = run_all([(1.0, {"grad_steps": 1})])
    two = run_all([(1.0, {"grad_steps": 2})])
    p1, p2 = peaks[start], peaks[start + 1]
    peaks.append(int(p1 + (max_k - 1) * (p2 - p1)))
    return {p: one.get(p, 0) + (mean_k - 1) * (two.get(p, 0) - one.get(p, 0))
            for p in {*one, *two}}  # fmt: skip


def _micro(task, cfg, params, x_t, cond, tracer, *, grad_steps=1, branches=1, x0_pass=False):  # noqa: ANN001
    """One baseline's loss as it makes its calls, then the backward. Arithmetic on values
    (gaussian_kl's checks, ``.item()`` statistics, random draws) is left out or written as
    the same arithmetic: meta tensors hold no values."""
    batch = x_t.shape[0]
    if cfg.method in RATIO_METHODS:  # clipped_ratio_loss: policy with gradients, reference
        k = torch.zeros(batch, dtype=torch.long)
        with tracer.phase("policy step"):
            mean, std = step_mean_std(task, x_t, k, cond, policy=True)
        with torch.no_grad(), tracer.phase("reference step"):
            ref_mean, _ = step_mean_std(task, x_t, k, cond, policy=False)
        x_next = torch.zeros_like(mean)  # the stored next state
        logp = gaussian_log_prob(x_next, mean, std)
        ratio = torch.exp((logp - torch.zeros_like(logp)) / x_next[0].numel())
        adv = torch.zeros_like(ratio)
        loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.9, 1.1)).mean()
        kl = ((mean - ref_mean) ** 2 / (2 * std**2)).flatten(1).sum(1)
        loss = loss + kl.mean()
        del mean, std, ref_mean, x_next, logp, ratio, adv, kl
    else:  # rollout_with_grad's steps with gradients, the x̂0 (ReFL), decode and reward
        T = task.kernel.num_steps
        losses = []
        for _ in range(branches):
            x, kl = x_t, torch.zeros(batch, device=x_t.device)
            for g in range(grad_steps):
                k = torch.full((batch,), T - grad_steps + g, dtype=torch.long)
                with tracer.phase("policy step"):
                    mean, std = step_mean_std(task, x, k, cond, policy=True)
                with torch.no_grad(), tracer.phase("reference step"):
                    ref_mean, _ = step_mean_std(task, x, k, cond, policy=False)
                kl = kl + ((mean - ref_mean) ** 2 / (2 * std**2)).flatten(1).sum(1)
                x = mean + std * torch.zeros_like(mean)
                del mean, std, ref_mean
            if x0_pass:  # ReFL: the policy's own one-step x̂0 from the state reached
                state = torch.full((batch,), T - 1, dtype=torch.long)
                with tracer.phase("x̂0 model"):
                    out = task.model_output(x, task.model_time(state, x), cond, policy=True)
                    x = task.kernel.x0(out, x, state)
                del out
            with tracer.phase("VAE decode"):
                images = task.reward_input(x)
            with tracer.phase("reward"):
                reward = task.reward_model(images, [""] * batch).float()
            losses.append((-reward + cfg.alpha * kl).mean())
            del x, images, reward, kl
        loss = torch.stack(losses).mean()
        del losses
    with tracer.phase("backward"):
        loss.backward()
    del loss
    for p in task.denoiser.parameters():
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
    per = {name: traces.flops.get(name, 0) / traces.batch for name in ALL_PHASES}  # per sample
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
    out |= {name: per[name] * cells for name in traces.phases() if name not in out}
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
