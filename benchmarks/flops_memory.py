"""FLOPs per update and traced GPU memory of every family at full size, without a GPU.

    python benchmarks/flops_memory.py --out benchmarks/results/flops-memory.json
    python benchmarks/flops_memory.py --models sd15 --resolutions 512 --batches 1,2,4 \
        --checkpointing on,off --out /tmp/sd15.json
    python benchmarks/flops_memory.py --models sd15 --batches 4 --fresh-trajectories 32 \
        --out benchmarks/results/flops-memory-presets.json
    python benchmarks/flops_memory.py --models sdxl,sd35m,sd35l,fluxdev --batches 1 \
        --quantize-base int8 --out benchmarks/results/flops-memory-int8.json
    python benchmarks/flops_memory.py --markdown benchmarks/results/flops-memory.json

Each row traces one update (sqdf.cost) of a model from its shipped configs
(sqdf/assets/model_configs, no weights) at the sd task defaults (50 steps, CFG 5, batch B
with 8 accumulation steps, replay ratio 1, bf16, LoRA rank 4, Tweedie's x̂0, the LAION
aesthetic reward on CLIP ViT-L/14): FLOPs by phase for sqdf's design (replay1: the run's
fresh trajectories an update, ``--fresh-trajectories``, by default 0 = B, the task default),
replay4, truncated and the reference design (the official trainer's B x 8 fresh trajectories
an update), and the traced peak of live GPU tensors. The presets sample 32 fresh
trajectories an update (4 x 8, the official budget): ``--batches 4 --fresh-trajectories 32``
gives their rows; with the default B fresh trajectories sqdf samples an eighth of the
reference's, which is a smaller budget, not a cheaper design.
Traced estimates on meta tensors, not measurements; see docs/performance.md for what the
trace cannot see. ``--markdown`` prints the table of a JSON file for docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_speed import command_line, write_json  # noqa: E402

DESIGNS = ("replay1", "replay4", "truncated", "reference")
NATIVE = {"sd15": 512, "sdxl": 1024, "sd35m": 1024, "sd35l": 1024, "fluxdev": 1024}


def row(
    model: str,
    folder: Path,
    resolution: int,
    batch: int,
    checkpointing: bool,
    vae_slicing: bool = False,
    fresh: int = 0,
    quantize_base: str = "none",
) -> dict:
    from sqdf.config.train_config import TrainConfig
    from sqdf.cost.model_configs import reward_clip
    from sqdf.cost.parts import meta_sd_task
    from sqdf.cost.update import gpu_peak, prompt_encoding_peak, trace_update, update_flops

    params = {"model": str(folder), "resolution": resolution, "guidance": 5.0,
              "gradient_checkpointing": checkpointing, "vae_slicing": vae_slicing,
              "quantize_base": quantize_base}  # fmt: skip
    cfg = TrainConfig(
        task="sd", estimator="tweedie", reward="aesthetic", batch_size=batch, grad_accum=8,
        num_steps=50, buffer="uniform", replay_ratio=1, fresh_trajectories=fresh,
        task_params=params,
    )  # fmt: skip
    clip, head = reward_clip()
    traces = trace_update(meta_sd_task(cfg, clip, head), cfg, batch)
    flops = {d: update_flops(traces, cfg, d) for d in DESIGNS}
    return {
        "model": model, "resolution": resolution, "batch": batch, "grad_accum": 8,
        "fresh_trajectories": cfg.fresh_count,
        "checkpointing": checkpointing, "vae_slicing": vae_slicing,
        "quantize_base": quantize_base,
        "flops": flops, "flops_total": {d: sum(f.values()) for d, f in flops.items()},
        "traced_peak_bytes": gpu_peak(traces), "live_tensor_peak_bytes": traces.peak,
        "phase_peak_bytes": traces.phase_peak, "weight_bytes": traces.parts,
        "trainable_state_bytes": traces.state, "text_encoder_bytes": traces.text_encoders,
        "prompt_encoding_peak_bytes": prompt_encoding_peak(traces),
        "denoiser_linear_bytes": traces.denoiser_linear,
    }  # fmt: skip


def linear_bytes(model: str) -> int:
    """The denoiser's Linear weights in bf16, built on meta from the shipped config (for rows
    written before the trace recorded them)."""
    import torch

    from sqdf.cost.model_configs import read_shipped
    from sqdf.cost.parts import linear_weight_bytes, made_on_meta
    from sqdf.tasks.sd_family import FAMILIES

    shipped = read_shipped(model)
    family = next(
        f for f in FAMILIES.values() if f.pipeline == shipped["model_index"]["_class_name"]
    )
    with made_on_meta(torch.bfloat16):
        net = family.denoiser_model().from_config(shipped["components"][family.denoiser])
    return linear_weight_bytes(net.requires_grad_(False))


def fresh_set(r: dict) -> bool:
    """Whether a row's fresh trajectories differ from its batch (rows before the field: no)."""
    return r.get("fresh_trajectories", r["batch"]) != r["batch"]


def markdown(doc: dict) -> str:
    """The table for docs/performance.md."""
    lines = [
        "| model | px | B | ckpt | traced peak | with an 8-bit base (projected) | weights | "
        "sqdf / reference FLOPs | TFLOP an update: sqdf (replay1) | replay4 | truncated | "
        "reference | text encoders (prompt encoding) |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    cache: dict[str, int] = {}
    for r in doc["rows"]:
        tot = r["flops_total"]
        if "denoiser_linear_bytes" not in r and r["model"] not in cache:
            cache[r["model"]] = linear_bytes(r["model"])
        linear = r.get("denoiser_linear_bytes", cache.get(r["model"], 0))
        # an int8 row's base is quantised in the trace itself: nothing left to project
        quantized = r.get("quantize_base", "none") != "none"
        projected = (
            "traced" if quantized else f"{(r['traced_peak_bytes'] - linear / 2) / 2**30:.1f} GiB"
        )
        lines.append(
            f"| {r['model']} | {r['resolution']} | {r['batch']}"
            f"{', ' + str(r['fresh_trajectories']) + ' fresh' if fresh_set(r) else ''} | "
            f"{'on' if r['checkpointing'] else 'off'}"
            f"{', VAE sliced' if r.get('vae_slicing') else ''}"
            f"{', int8 base' if quantized else ''} | "
            f"{r['traced_peak_bytes'] / 2**30:.1f} GiB | "
            f"{projected} | "
            f"{sum(r['weight_bytes'].values()) / 2**30:.1f} GiB | "
            f"1/{tot['reference'] / tot['replay1']:.1f} | {tot['replay1'] / 1e12:,.0f} | "
            f"{tot['replay4'] / 1e12:,.0f} | {tot['truncated'] / 1e12:,.0f} | "
            f"{tot['reference'] / 1e12:,.0f} | "
            f"{r['text_encoder_bytes'] / 2**30:.1f} GiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from sqdf.cost.model_configs import MODELS, write_config_folder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated shipped models")
    ap.add_argument("--resolutions", default="native",
                    help="comma-separated sides in px, or native (each model's own)")  # fmt: skip
    ap.add_argument("--batches", default="1,2,4", help="micro-batch sizes B")
    ap.add_argument("--checkpointing", default="on", help="on, off or on,off")
    ap.add_argument(
        "--fresh-trajectories",
        type=int,
        default=0,
        help="fresh trajectories an update (0: the batch, the task default)",
    )
    ap.add_argument("--vae-slicing", action="store_true", help="decode one image at a time")
    ap.add_argument("--quantize-base", default="none", choices=("none", "int8"),
                    help="the frozen base's Linear weights: none, or int8 (torchao)")  # fmt: skip
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    ap.add_argument("--markdown", metavar="JSON", help="print the table of a results file")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model {unknown[0]!r}; known: {', '.join(MODELS)}")
    rows = []
    root = Path(tempfile.mkdtemp(prefix="sqdf-configs-"))
    for model in models:
        folder = write_config_folder(model, root / model)
        sides = [NATIVE[model]] if args.resolutions == "native" else [
            int(s) for s in args.resolutions.split(",")]  # fmt: skip
        for side in sides:
            for ckpt in [c == "on" for c in args.checkpointing.split(",")]:
                for batch in [int(b) for b in args.batches.split(",")]:
                    r = row(
                        model, folder, side, batch, ckpt, args.vae_slicing,
                        args.fresh_trajectories, args.quantize_base,
                    )  # fmt: skip
                    rows.append(r)
                    print(
                        f"{model} {side}px B={batch} ckpt={'on' if ckpt else 'off'}: traced "
                        f"peak {r['traced_peak_bytes'] / 2**30:.2f} GiB, "
                        f"{r['flops_total']['replay1'] / 1e12:,.0f} TFLOP an update "
                        f"(reference {r['flops_total']['reference'] / 1e12:,.0f})", flush=True,
                    )  # fmt: skip
                    write_json({"command": command_line(__file__, argv), "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
