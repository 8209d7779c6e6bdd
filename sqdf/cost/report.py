"""The dry run's cost section: FLOPs per update by phase against the reference design, the
traced GPU memory by part, and, against a card's memory, whether it fits and what each
setting that lowers the peak would bring. Every figure is a traced estimate."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqdf.config.train_config import TrainConfig
from sqdf.cost.memory import ALLOCATOR_MARGIN, CUDA_CONTEXT, fits, gib, headroom
from sqdf.cost.model_configs import reward_clip
from sqdf.cost.parts import meta_sd_task
from sqdf.cost.update import (
    BLIND_SPOTS,
    Traces,
    gpu_peak,
    prompt_encoding_peak,
    run_design,
    trace_update,
    update_flops,
)
from sqdf.tasks import resolved_reward_name


def _reward_parts(cfg: TrainConfig) -> tuple[dict, list[int], str]:
    """The reward network to trace: the aesthetic reward's own CLIP config where the run
    names one, else CLIP ViT-L/14 with the LAION head standing in (said in the output)."""
    config, head = reward_clip()
    reward = resolved_reward_name(cfg)
    folder = cfg.reward_params.get("clip") if reward == "aesthetic" else None
    if folder and (Path(folder).expanduser() / "config.json").is_file():
        config = json.loads((Path(folder).expanduser() / "config.json").read_text())
        width = int(config.get("projection_dim", head[0]))  # the head reads the projection
        return config, [width, *head[1:]], "the aesthetic reward's CLIP"
    if reward == "aesthetic":
        return config, head, "the aesthetic reward (CLIP ViT-L/14, shipped config)"
    return (
        config,
        head,
        (f"CLIP ViT-L/14 with the aesthetic head standing in for reward {reward!r}"),
    )


def traced_reward_note(cfg: TrainConfig, swap: RewardSwap | None) -> str:
    """What the trace scored with, in words: the reward's network, or the swap (sqdf bbo's
    proxy) over the CLIP it reads, said to stand in where it is not the reward's own."""
    _, _, note = _reward_parts(cfg)
    reward = resolved_reward_name(cfg)
    if swap is None:
        return note
    if reward == "aesthetic":
        return f"{swap.label} over the CLIP of {note}"
    return f"{swap.label} over CLIP ViT-L/14, standing in for the CLIP of reward {reward!r}"


@dataclass(frozen=True)
class RewardSwap:
    """What an update scores with instead of the task's reward (sqdf bbo's proxy): ``build``
    makes it on meta from the traced task's reward; ``label`` names it in the cost section."""

    label: str
    build: Callable[[Any], Any]


def trace_run(
    cfg: TrainConfig, *, on_gpu: bool = True, step: int = 0, swap: RewardSwap | None = None
) -> Traces:
    """Traces of one update of ``cfg`` at its micro-batch (batch_size x cells_per_trajectory
    cells), the gradient's cells at step ``step``; dtype auto resolved as on a GPU, or with
    ``on_gpu`` False as on the CPU; scored by ``swap``'s reward where given."""
    config, head, _ = _reward_parts(cfg)
    meta = meta_sd_task(cfg, config, head, on_gpu=on_gpu)
    if swap is not None:
        meta.task.reward_model = swap.build(meta.task.reward_model)
    return trace_update(meta, cfg, batch=cfg.batch_size * cfg.cells_per_trajectory, step=step)


def _with(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    params = changes.pop("task_params", {})
    return dataclasses.replace(cfg, task_params={**cfg.task_params, **params}, **changes)


def trained_side(cfg: TrainConfig) -> int:
    """The image side in pixels the run trains at: its resolution, else the model's native
    side (read from the model folder's configs as the sd task reads it)."""
    from sqdf.config.params import build_settings
    from sqdf.tasks.sd import SDConfig, image_side

    return image_side(build_settings(SDConfig, cfg.task_params, "task 'sd'"))


def levers(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """Settings that lower the traced peak, cheapest to the experiment first: VAE slicing
    (free), checkpointing (time only), a smaller micro-batch with more accumulation (same
    cells per update), an int8 frozen base (the same run over slightly rounded weights;
    where torchao is installed), then a lower resolution (another experiment)."""
    out: list[tuple[str, TrainConfig]] = []
    if not cfg.task_params.get("vae_slicing", False) and cfg.batch_size > 1:
        out.append((
            "--task-param vae_slicing=true (the same images, no more FLOPs)",
            _with(cfg, task_params={"vae_slicing": True}),
        ))  # fmt: skip
        cfg = out[-1][1]
    if not cfg.task_params.get("gradient_checkpointing", True):
        out.append((
            "--task-param gradient_checkpointing=true",
            _with(cfg, task_params={"gradient_checkpointing": True}),
        ))  # fmt: skip
        cfg = out[-1][1]
    batch = cfg.batch_size
    # fresh_trajectories 0 means "the batch": pinned to the run's count, a smaller batch
    # samples as many trajectories (in more passes); a truncated rollout samples per
    # micro-batch, as many in all
    pin = {} if cfg.rollout == "truncated" else {"fresh_trajectories": cfg.fresh_count}
    pin_flag = f" --fresh-trajectories {cfg.fresh_count}" if pin else ""
    from sqdf.methods import build_method_params, group_size

    unit = group_size(cfg.method, build_method_params(cfg.method, cfg.method_params))
    while batch > 1 and batch % (2 * unit) == 0:  # a grouped method's batch is whole groups
        batch //= 2
        accum = cfg.grad_accum * cfg.batch_size // batch
        out.append((
            f"--batch-size {batch} --grad-accum {accum}{pin_flag} (same cells and fresh "
            "trajectories per update)",
            _with(cfg, batch_size=batch, grad_accum=accum, **pin),
        ))  # fmt: skip
    smallest = out[-1][1] if out else cfg
    if quantizable(smallest):
        out.append((
            "--task-param quantize_base=int8 (the frozen base's Linear weights in int8: a "
            "slightly different model, docs/performance.md), with the above",
            _with(smallest, task_params={"quantize_base": "int8"}),
        ))  # fmt: skip
        smallest = out[-1][1]
    side = trained_side(cfg)  # the resolution set, else the model's native side
    for res in (768, 512):
        if res < side:
            out.append((
                f"--task-param resolution={res} (another experiment), with the above",
                _with(smallest, task_params={"resolution": res}),
            ))  # fmt: skip
    return out


def quantizable(cfg: TrainConfig) -> bool:
    """Whether the int8 base is a lever for ``cfg``: a LoRA run whose base is not quantised
    yet, with torchao installed to run it."""
    import importlib.util

    params = cfg.task_params
    return (
        params.get("quantize_base", "none") == "none"
        and params.get("finetune", "lora") == "lora"
        and importlib.util.find_spec("torchao") is not None
    )


def cost_lines(
    cfg: TrainConfig, gpu_memory: int | None, swap: RewardSwap | None = None
) -> list[str]:
    """The dry run's section on what an update costs (sd task: each method's update as its
    loss makes its calls, sqdf.cost.update; sqdf's beside the reference design's).
    ``swap``: what the update scores with where it is not the task's reward (sqdf bbo's
    proxy): traced on the sd task; on the small tasks their reward stands in, said so."""
    if cfg.task != "sd":
        from sqdf.cost.small_tasks import small_task_lines

        lines = small_task_lines(cfg, gpu_memory)
        if swap is not None:
            stand_in = f"the task's reward {resolved_reward_name(cfg)!r}"
            lines.insert(1, f"  reward traced: {stand_in} standing in for {swap.label}")
        return lines
    traces = trace_run(cfg, swap=swap)
    reward_note = traced_reward_note(cfg, swap)
    design = run_design(cfg)
    ours = update_flops(traces, cfg, design)
    # the reference design is SQDF's official trainer: a comparison for method sqdf only
    ref = update_flops(traces, cfg, "reference") if cfg.method == "sqdf" else None
    dtype = str(meta_dtype(cfg)).removeprefix("torch.")
    lines = [
        f"cost of one update (traced estimates, not measurements; method {cfg.method}, {dtype}, "
        f"LoRA, reward traced: {reward_note}):",
        f"  FLOPs by phase        this run ({design})"
        + ("     reference design" if ref is not None else ""),
    ]
    phases = traces.phases()
    for phase in phases:
        row = f"    {phase:<22} {ours[phase] / 1e12:>12.2f} TFLOP"
        lines.append(row + (f" {ref[phase] / 1e12:>12.2f} TFLOP" if ref is not None else ""))
    total = sum(ours.values())
    if ref is not None:
        ref_total = sum(ref.values())
        lines.append(
            f"    {'total':<22} {total / 1e12:>12.2f} TFLOP {ref_total / 1e12:>12.2f} TFLOP "
            f"(this run: {total / ref_total:.2f} of the reference design)"
        )
    else:
        lines.append(f"    {'total':<22} {total / 1e12:>12.2f} TFLOP")
    if traces.note:
        lines.append(f"    {traces.note}")
    peak = gpu_peak(traces)
    parts = ", ".join(f"{role} {gib(n)}" for role, n in traces.parts.items())
    lines += [
        f"  traced GPU memory (micro-batch {traces.batch} cells, checkpointing "
        f"{'on' if cfg.task_params.get('gradient_checkpointing', True) else 'off'}):",
        f"    weights: {parts}",
        f"    LoRA in float32 with its gradient and AdamW moments: {gib(traces.state)}",
        f"    peak of one update: {gib(peak)} (live tensors {gib(traces.peak)} + optimizer "
        f"state); by phase: "
        + ", ".join(f"{p} {gib(traces.phase_peak.get(p, 0))}" for p in phases),
        f"    while prompts are encoded (every text encoder, before the denoiser is loaded): "
        f"{gib(prompt_encoding_peak(traces))}",
        f"    {BLIND_SPOTS}",
    ]
    if gpu_memory is None:
        lines.append("  fit: no --gpu-memory given and no GPU detected")
        return lines
    worst = max(peak, prompt_encoding_peak(traces))
    room = (
        f"traced peak {gib(worst)} + headroom {gib(headroom(worst))}: CUDA context "
        f"{gib(CUDA_CONTEXT)} and allocator margin {ALLOCATOR_MARGIN:.0%} of the peak"
    )
    if fits(worst, gpu_memory):
        lines.append(f"  fit: fits {gib(gpu_memory)} ({room})")
        return lines
    lines.append(
        f"  fit: does not fit {gib(gpu_memory)} ({room}); the traced peak after each change "
        "(each with those above it; the same headroom added), up to the first that fits:"
    )
    for flag, changed in levers(cfg):
        after = trace_run(changed, swap=swap)
        ok = fits(max(gpu_peak(after), prompt_encoding_peak(after)), gpu_memory)
        lines.append(f"    {flag}: {gib(gpu_peak(after))} ({'fits' if ok else 'does not fit'})")
        if ok:
            break
    if prompt_encoding_peak(traces) > gpu_memory:
        lines.append("    the prompt encoding holds every text encoder at once: its peak "
                     "stays whatever the batch")  # fmt: skip
    return lines


def meta_dtype(cfg: TrainConfig) -> Any:
    from sqdf.config.params import build_settings
    from sqdf.cost.parts import compute_dtype
    from sqdf.tasks.sd import SDConfig

    return compute_dtype(build_settings(SDConfig, cfg.task_params, "task 'sd'"))
