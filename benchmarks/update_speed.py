"""The reference implementation's update design against ours, in one run on one machine.

    python benchmarks/update_speed.py --task digits --out benchmarks/results/speed-cpu.json
    python benchmarks/update_speed.py --task sd --preset sd15 --updates 6   # on a GPU
    python benchmarks/update_speed.py --task sd --preset sdxl --batch-size 2 --updates 5 \
        --designs reference,replay4 --eval-samples 0   # SDXL at 1024 px, on a GPU
    python benchmarks/update_speed.py --task sd --preset sd15 --designs reference \
        --eval-samples 0 --task-param gradient_checkpointing=false   # time and memory only

Designs (same model, reward, alpha, gamma, estimator, lr and cells per update):
- reference: every update samples B whole trajectories without gradients, then one
  gradient step on B (trajectory, step) cells of that batch (the SQDF reference design);
- truncated: the same, but each trajectory runs only to the step its cell uses;
- truncated_x<M>: B/M trajectories, M steps each, still B cells (several steps per
  trajectory);
- replay<N>: whole trajectories into a prioritized replay buffer, N updates per fresh batch.
By default: reference, truncated, truncated_x2, replay4, replay8.

For each: seconds per update (after a warm-up update, over whole replay cycles), the share
of that time spent sampling fresh trajectories and scoring them (the rest is the gradient
step), fresh trajectories per second, peak memory (CUDA allocator peak on a GPU; the process's
peak RSS on the CPU, each design in its own process), and the reward gained over the reference
model per wall-second of training (mean reward of ``--eval-samples`` samples, same seed,
fine-tuned minus reference). Prints a table and writes JSON. ``--eval-samples 0`` skips the
scoring (time and memory only); ``--task-param`` applies a task setting (dtype,
gradient_checkpointing, channels_last, compile, ...) to every design.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqdf.cost.update import design_settings  # the designs sqdf.cost counts

DESIGNS = ["reference", "truncated", "truncated_x2", "replay4", "replay8"]  # the default run


SD_BATCH = 4  # the setting: batch 4 at SD 1.5 size
DIGITS = {"task": "digits", "reward": "ink", "alpha": 0.1, "gamma": 0.9,
          "estimator": "consistency", "num_steps": 20, "batch_size": 32, "lr": 1e-3}  # fmt: skip


# each family's native size; the tiny ones 16
RESOLUTIONS = {"sd15": 512, "sdxl": 1024, "sd35m": 1024, "fluxdev": 1024}


def base_config(task: str, preset: str, parts: Path, batch_size: int = SD_BATCH) -> dict:
    if task == "digits":
        return dict(DIGITS)
    from sqdf.tasks.sd_random import write_parts

    paths = write_parts(parts, preset)
    # SD 3/3.5 and FLUX.1 have no consistency model here: Tweedie's x̂0 (the flow's x_t - t v);
    # FLUX.1-dev takes the guidance scale as an input (one pass, no negative) where the
    # others run CFG's two
    lcm = {"lcm": paths["lcm"]} if "lcm" in paths else {}
    return {
        "task": "sd", "reward": "aesthetic", "alpha": 0.1, "gamma": 0.9,
        "estimator": "consistency" if lcm else "tweedie", "num_steps": 50,
        "batch_size": batch_size, "lr": 1e-4,
        "task_params": {"model": paths["model"], **lcm, "guidance": 5.0,
                        "resolution": RESOLUTIONS.get(preset, 16)},
        "reward_params": {"clip": paths["clip"], "head": paths["head"]},
    }  # fmt: skip


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"


def peak_memory() -> tuple[float, str]:
    """(GiB, what was measured): the CUDA allocator's peak on a GPU, else the process's max RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda allocator"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, "process max RSS"


def command_line(script: str, argv: list[str] | None) -> str:
    """How a benchmark was run, for its JSON: ``script`` is the caller's ``__file__``."""
    return " ".join(["python", f"benchmarks/{Path(script).name}", *(argv or sys.argv[1:])])


def write_json(doc: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=1))
        print(f"wrote {out}")


def run_design(name: str, base: dict, updates: int, eval_samples: int) -> dict:
    """Train one design in this process; time it; score it."""
    import torch

    from sqdf.evaluation.evaluate import load_run, score_samples
    from sqdf.run.folder import read_metrics
    from sqdf.run.settings import make_config
    from sqdf.sampling.sampler import sample_trajectories
    from sqdf.training.trainer import train

    settings = design_settings(name)
    values = {**base, **settings, "steps": updates, "log_every": 1, "checkpoint_every": 0,
              "buffer_size": max(64, 4 * base["batch_size"])}  # fmt: skip
    # the same cells per update: fewer trajectories, each giving several steps
    values["batch_size"] = max(1, base["batch_size"] // settings.get("cells_per_trajectory", 1))
    cfg = make_config(values, source=f"benchmark {name}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        run = train(cfg, Path(tmp) / "run", progress=False)
        rows = read_metrics(run)
        walls = [r["wall_s"] for r in rows]
        scores = {True: math.nan, False: math.nan}
        if eval_samples:
            task = load_run(run)
            g = torch.Generator().manual_seed(1234)
            cond = task.sample_conditions(eval_samples, g)
            for policy in (True, False):
                x0 = sample_trajectories(task, eval_samples, torch.Generator().manual_seed(7),
                                         policy=policy, cond=cond).x0  # fmt: skip
                scores[policy] = float(score_samples(task, x0, cond).mean())
    # timed: whole replay cycles after the warm-up update (which samples), so a design that
    # samples every N updates is timed over updates that sample exactly 1 in N times
    cycle = settings["replay_ratio"]
    timed = (len(rows) - 1) // cycle * cycle
    mean = (walls[timed] - walls[0]) / timed
    sampling = rows[timed]["sample_s"] - rows[0]["sample_s"]
    train_s = walls[-1]
    gain = scores[True] - scores[False]
    return {
        "design": name,
        "settings": {k: values[k] for k in ("rollout", "buffer", "replay_ratio", "batch_size")}
        | {"cells_per_trajectory": values.get("cells_per_trajectory", 1)},
        "s_per_update": round(mean, 4),
        "first_update_s": round(walls[0], 3),
        "timed_updates": timed,
        "sampling_share": round(sampling / (walls[timed] - walls[0]), 3),
        "trajectories_per_s": round(rows[-1]["samples_seen"] / train_s, 2),
        "peak_memory_gib": round(peak_memory()[0], 3),
        "peak_memory_kind": peak_memory()[1],
        "train_s": round(train_s, 2),
        "reward_reference": round(scores[False], 4) if eval_samples else None,
        "reward_finetuned": round(scores[True], 4) if eval_samples else None,
        "reward_gain_per_s": round(gain / train_s, 5) if eval_samples else None,
    }


def main(argv: list[str] | None = None) -> int:
    from sqdf.tasks.sd_random import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=["digits", "sd"], default="digits")
    ap.add_argument("--preset", choices=PRESETS, default="tiny", help="sd sizes")
    ap.add_argument(
        "--batch-size", type=int, default=SD_BATCH,
        help=f"sd: trajectory-step cells per update ({SD_BATCH})",
    )  # fmt: skip
    ap.add_argument("--updates", type=int, default=30, help="updates per design")
    ap.add_argument(
        "--num-steps", type=int, default=None,
        help="sampling steps per trajectory (default: digits 20, sd 50)",
    )  # fmt: skip
    ap.add_argument(
        "--designs", default=",".join(DESIGNS),
        help="comma-separated: reference, truncated, truncated_x<M>, replay<N>",
    )  # fmt: skip
    ap.add_argument("--eval-samples", type=int, default=256)
    ap.add_argument("--parts", default=None, help="sd: folder to keep the random parts in")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    ap.add_argument(
        "--task-param", action="append", default=[], metavar="KEY=VALUE",
        help="a task parameter for every design, e.g. channels_last=true (repeatable)",
    )  # fmt: skip
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one design
    args = ap.parse_args(argv)
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    unknown = [d for d in designs if design_settings(d) is None]
    if unknown:
        ap.error(
            f"unknown design {unknown[0]!r}; known: reference, truncated, truncated_x<M>, "
            "replay<N> (M, N positive integers)"
        )
    if args.batch_size < 1:
        ap.error(f"--batch-size must be >= 1, got {args.batch_size}")
    base_batch = args.batch_size if args.task == "sd" else DIGITS["batch_size"]
    uneven = [d for d in designs
              if base_batch % design_settings(d).get("cells_per_trajectory", 1)]  # fmt: skip
    if uneven:
        ap.error(
            f"design {uneven[0]!r}: its steps per trajectory must divide the batch "
            f"({base_batch}), so that every design makes the same number of cells"
        )
    cycle = max(design_settings(d)["replay_ratio"] for d in designs)
    if args.updates < cycle + 1:
        ap.error(
            f"--updates must be >= {cycle + 1}: a warm-up update, then at least one whole "
            f"replay cycle ({cycle} updates) of every design"
        )
    parts = Path(args.parts or tempfile.mkdtemp(prefix="sqdf-speed-"))
    base = base_config(args.task, args.preset, parts, args.batch_size)
    if args.num_steps is not None:
        if args.num_steps < 1:
            ap.error(f"--num-steps must be >= 1, got {args.num_steps}")
        base["num_steps"] = args.num_steps
    from sqdf.commands.args import key_values
    from sqdf.errors import SqdfError

    try:  # read as sqdf train reads --task-param
        extra = key_values(args.task_param, "--task-param")
    except SqdfError as err:
        ap.error(str(err))
    base["task_params"] = {**base.get("task_params", {}), **extra}
    if args.one:  # a child process: one design, its result as JSON on stdout's last line
        print(json.dumps(run_design(args.one, base, args.updates, args.eval_samples)))
        return 0

    results = []
    for name in designs:
        # a process per design, so each one's peak memory is its own
        cmd = [sys.executable, __file__, "--task", args.task, "--preset", args.preset,
               "--updates", str(args.updates), "--eval-samples", str(args.eval_samples),
               "--batch-size", str(args.batch_size), "--num-steps", str(base["num_steps"]),
               "--parts", str(parts), "--designs", name, "--one", name]  # fmt: skip
        cmd += [f"--task-param={item}" for item in args.task_param]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return 1
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    ref = results[0]["s_per_update"] if designs[0] == "reference" else None
    doc = {
        "task": args.task, "preset": args.preset if args.task == "sd" else None,
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name(),
        "updates": args.updates, "eval_samples": args.eval_samples, "base": base,
        "command": command_line(__file__, argv),
        "results": results,
    }  # fmt: skip
    print(f"{doc['task']} on {doc['device']}, {args.updates} updates per design")
    print("| design | s/update | speed-up | sampling share | trajectories/s | peak GiB | "
          "reward gain/s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        speed = f"{ref / r['s_per_update']:.2f}x" if ref else "-"
        print(f"| {r['design']} | {r['s_per_update']} | {speed} | {r['sampling_share']:.0%} | "
              f"{r['trajectories_per_s']} | {r['peak_memory_gib']} | "
              f"{r['reward_gain_per_s']} |")  # fmt: skip
    write_json(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
