"""Peak memory and time of one SQDF gradient step at Stable Diffusion size: the part of an
update that holds activations (sampling runs without gradients), so its peak is the update's.

    python benchmarks/step_memory.py --preset sd15 --parts /tmp/sd15 --resolution 512
    python benchmarks/step_memory.py --preset sd15 --task-param dtype=bfloat16   # on a GPU
    python benchmarks/step_memory.py --preset sdxl --parts /tmp/sdxl --batch-size 2   # 1024 px
    python benchmarks/step_memory.py --preset fluxdev --parts /tmp/fluxdev --resolution 512
    python benchmarks/step_memory.py --preset sd15 --set estimator=gaussian_posterior \
        --set q_cov=isotropic --set q_draws=4   # another soft-Q estimator

Builds the sd task on random-initialised parts of the real classes (the settings of
``update_speed.py``: CFG 5, LCM UNet x̂0 (an LCM-LoRA on SDXL; Tweedie's on SD 3.5 and
FLUX.1, whose guidance 5 is an input), CLIP + aesthetic head,
gradient checkpointing on, the family's native resolution),
draws ``--batch-size`` random latents as the states before step ``--step`` (0: the first and
noisiest, where the LCM estimator runs; the last step needs none), and times the SQDF loss
and its backward twice (the first allocates). Memory is the CUDA allocator's peak on a GPU,
the process's peak RSS on the CPU (weights included once used: safetensors files are mapped
into memory lazily, so the peak up to the end of loading, printed too, undercounts them).
Prints one line and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the same model, reward and settings, measured and written the same way
from update_speed import (  # noqa: E402
    base_config,
    command_line,
    device_name,
    peak_memory,
    write_json,
)


def main(argv: list[str] | None = None) -> int:
    from sqdf.tasks.sd_random import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=PRESETS, default="tiny", help="sd sizes")
    ap.add_argument("--parts", default=None, help="folder to keep the random parts in")
    ap.add_argument("--resolution", type=int, default=None, help="image side in pixels")
    ap.add_argument("--batch-size", type=int, default=4, help="states per step (4)")
    ap.add_argument("--step", type=int, default=0, help="step index k in 0..num_steps-1 (0)")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    ap.add_argument(
        "--task-param", action="append", default=[], metavar="KEY=VALUE",
        help="a task parameter, e.g. dtype=bfloat16 or gradient_checkpointing=false",
    )  # fmt: skip
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a train setting, e.g. estimator=gaussian_posterior (read as sqdf compare's --set)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    import torch

    from sqdf.commands.args import key_values
    from sqdf.errors import SqdfError
    from sqdf.methods import METHODS, build_method_params
    from sqdf.run.settings import make_config
    from sqdf.sampling.buffer import Cells
    from sqdf.tasks import build_task
    from sqdf.training.gradients import wait_for

    try:  # read as sqdf train reads --task-param, and sqdf compare --set
        extra = key_values(args.task_param, "--task-param")
        settings = key_values(args.set, "--set")
    except SqdfError as err:
        ap.error(str(err))
    parts = Path(args.parts or tempfile.mkdtemp(prefix="sqdf-step-"))
    base = base_config("sd", args.preset, parts)
    if args.resolution is not None:
        extra = {"resolution": args.resolution, **extra}
    extra = {**extra, **settings.pop("task_params", {})}
    base["task_params"] = {**base["task_params"], **extra}
    if settings.get("estimator", base["estimator"]) != "consistency":
        base["task_params"].pop("lcm", None)  # unread: its weights would count in the peak
    try:
        cfg = make_config(
            {**base, **settings, "batch_size": args.batch_size, "steps": 1}, source="bench"
        )
    except SqdfError as err:
        ap.error(str(err))
    if not 0 <= args.step < cfg.num_steps:
        ap.error(f"--step must be in [0, {cfg.num_steps - 1}], got {args.step}")
    task = build_task(cfg)
    loaded = peak_memory()[0]
    g = torch.Generator().manual_seed(0)
    n = args.batch_size
    cells = Cells(
        x_t=torch.randn((n, *task.sample_shape), generator=g), x_next=None,
        step=torch.full((n,), args.step), cond=task.sample_conditions(n, g),
        reward=torch.full((n,), float("nan")), index=torch.full((n,), -1),
    )  # fmt: skip
    params = build_method_params("sqdf", {})
    seconds = []
    for _ in range(2):
        task.policy.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss, _ = METHODS["sqdf"].loss(task, cells, cfg, params, g)
        loss.backward()
        wait_for(task.device)
        seconds.append(time.perf_counter() - t0)
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name(),
        "command": command_line(__file__, argv),
        "preset": args.preset, "batch_size": n, "step": args.step, "settings": settings,
        "task_params": {k: v for k, v in cfg.task_params.items() if k not in ("model", "lcm")},
        "estimator": cfg.estimator,
        "loss_finite": bool(torch.isfinite(loss)),
        "first_step_s": round(seconds[0], 2), "step_s": round(seconds[1], 2),
        "memory_kind": peak_memory()[1],
        "after_loading_gib": round(loaded, 3), "peak_gib": round(peak_memory()[0], 3),
    }  # fmt: skip
    try:
        doc |= traced_peaks(cfg, task.device.type == "cuda", args.step)
    except SqdfError as err:  # an estimator the trace does not follow
        print(f"not traced: {err}")
    if (
        doc["memory_kind"].startswith("cuda") and "traced_step_peak_gib" in doc
    ):  # the first GPU run calibrates the tracer
        print(
            f"traced against measured: gradient step {doc['traced_step_peak_gib']} GiB, "
            f"prompt encoding {doc['traced_prompt_encoding_gib']} GiB (traced), "
            f"max_memory_allocated {doc['peak_gib']} GiB (measured)"
        )
    print(json.dumps(doc))
    write_json(doc, args.out)
    return 0


def traced_peaks(cfg, on_gpu: bool, step: int) -> dict:  # noqa: ANN001
    """sqdf.cost's traced estimates for the same step: the gradient micro-batch's peak with the
    optimizer's state, and the peak while prompts are encoded (what max_memory_allocated,
    counting from the process's start, also sees)."""
    from sqdf.cost.report import trace_run
    from sqdf.cost.update import GRADIENT_PHASES, prompt_encoding_peak

    traces = trace_run(cfg, on_gpu=on_gpu, step=step)
    step_peak = max(traces.phase_peak.get(p, 0) for p in GRADIENT_PHASES) + traces.state
    return {
        "traced_step_peak_gib": round(step_peak / 2**30, 3),
        "traced_prompt_encoding_gib": round(prompt_encoding_peak(traces) / 2**30, 3),
    }


if __name__ == "__main__":
    sys.exit(main())
