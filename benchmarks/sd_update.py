"""Seconds per SQDF update and peak memory for the sd task, on random-initialised parts of
the real classes (nothing downloaded).

    python benchmarks/sd_update.py --preset sd15 --out benchmarks/results/sd15-h100.json
    python benchmarks/sd_update.py --preset tiny            # the same code path, in seconds

sd15 is the paper's setting: SD 1.5 UNet/VAE/text encoder, 512×512, batch 4, CFG 5, DDIM
50 steps eta 1, a random LCM UNet as the x̂0 estimator, the LAION-aesthetic-shaped reward on
a CLIP ViT-L/14. Each update samples a fresh batch (replay ratio 1), so its time is the
whole update: 50 guided sampling steps plus one step with gradients. The first update is
reported apart (warm-up); the rest give the mean. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sqdf.config import make_config
from sqdf.run import read_metrics
from sqdf.tasks.sd_random import write_parts
from sqdf.trainer import train

SETTINGS = {
    "sd15": {"resolution": 512, "batch_size": 4, "num_steps": 50},
    "tiny": {"resolution": 16, "batch_size": 4, "num_steps": 50},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(SETTINGS), default="tiny")
    ap.add_argument("--updates", type=int, default=4, help="updates to time (first = warm-up)")
    ap.add_argument("--dtype", default="auto", help="sd dtype: auto, bfloat16, float16, float32")
    ap.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off")
    ap.add_argument("--parts", default=None, help="folder to keep the random parts in")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = ap.parse_args(argv)
    if args.updates < 2:
        ap.error("--updates must be >= 2 (the first is a warm-up)")
    s = SETTINGS[args.preset]
    parts_dir = Path(args.parts or tempfile.mkdtemp(prefix=f"sqdf-{args.preset}-"))
    t0 = time.perf_counter()
    paths = write_parts(parts_dir, args.preset)
    build_s = time.perf_counter() - t0
    cfg = make_config(
        {
            "task": "sd", "method": "sqdf", "reward": "aesthetic", "estimator": "consistency",
            "steps": args.updates, "batch_size": s["batch_size"], "num_steps": s["num_steps"],
            "eta": 1.0, "replay_ratio": 1, "buffer": "prioritized", "buffer_size": 64,
            "log_every": 1, "checkpoint_every": 0,
            "task_params": {
                "model": paths["model"], "lcm": paths["lcm"],
                "resolution": s["resolution"], "guidance": 5.0, "dtype": args.dtype,
                "gradient_checkpointing": not args.no_checkpointing,
            },
            "reward_params": {"clip": paths["clip"], "head": paths["head"]},
        },
        source="benchmark",
    )  # fmt: skip
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        run = train(cfg, Path(tmp) / "run", progress=False)
        rows = read_metrics(run)
        config = json.loads((run / "config.json").read_text())
    walls = [r["wall_s"] for r in rows]
    per_update = [b - a for a, b in zip(walls, walls[1:], strict=False)]
    mean = statistics.mean(per_update)
    result = {
        "preset": args.preset,
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "resolved_device": config["resolved"]["device"],
        "gradient_checkpointing": not args.no_checkpointing,
        **s,
        "guidance": 5.0,
        "first_update_s": round(walls[0], 3),
        "s_per_update": round(mean, 3),
        "images_per_s": round(s["batch_size"] / mean, 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "updates_timed": len(per_update),
        "parts_build_s": round(build_s, 1),
        "command": " ".join(["python", "benchmarks/sd_update.py", *(argv or sys.argv[1:])]),
    }
    print("| preset | device | dtype | batch | res | s/update | images/s | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {args.preset} | {result['device']} | {result['resolved_device']} {args.dtype} | "
          f"{s['batch_size']} | {s['resolution']} | {result['s_per_update']} | "
          f"{result['images_per_s']} | {result['peak_memory_gib']} |")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
