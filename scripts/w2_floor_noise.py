"""How noisy the sliced-W2 floor is, and what the families' W2 bound says against its mean.

The goal's W2 bound divides a run's sliced W2 to its target by the sampler's floor: the
sliced W2 between the reference sampler's samples and exact draws of the distribution it
discretises, one draw of NUM_SAMPLES each (``sqdf.tasks.gmm2d`` evaluate). This script draws
that floor DRAWS times per mixture (fresh reference chains, fresh exact draws, fresh
directions) and reports its mean and spread, beside the spread of the sliced W2 between two
independent exact samples of the target (what sampling alone leaves). With ``--summary``
(a gmm_families.py summary.json whose rows carry the raw ``target_sliced_w2``), it divides
each run's W2 by the floor's mean instead of its one draw and counts the goal both ways.

    .venv/bin/python scripts/w2_floor_noise.py --out runs/w2-floor-noise --families 8 \
        --summary docs/results/gmm2d-families-exact-heldout-accum16/summary.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gmm_families import meets_goal, mixtures  # noqa: E402

from sqdf.evaluators.metrics import sliced_w2  # noqa: E402
from sqdf.infra.atomic import atomic_write_text  # noqa: E402
from sqdf.run.settings import make_config  # noqa: E402
from sqdf.sampling.sampler import sample_trajectories  # noqa: E402
from sqdf.tasks import build_task  # noqa: E402


def readings(
    mixture: dict[str, Any], reward: str, args: argparse.Namespace, floor: bool
) -> dict[str, list[float]]:
    """DRAWS readings of two exact target samples against each other and, with ``floor``,
    of the floor (reference sampler against its exact output), NUM_SAMPLES points each."""
    cfg = make_config(
        {"task": "gmm2d", "method": "sqdf", "estimator": "exact", "gamma": 1.0,
         "num_steps": args.num_steps, "reward": reward, "alpha": args.alpha, "device": "cpu",
         "task_params": mixture},
        source="w2_floor_noise",
    )  # fmt: skip
    task, n = build_task(cfg), args.num_samples
    target, output = task.target(), task.reference_output()
    out: dict[str, list[float]] = {"floor": [], "target_noise": []}
    for d in range(args.draws):
        g = torch.Generator().manual_seed(10_000 + d)
        pair = (target.sample(n, g), target.sample(n, g))
        out["target_noise"].append(sliced_w2(*pair, torch.Generator().manual_seed(d)))
        if floor:
            with torch.no_grad():
                ref = sample_trajectories(task, n, g, policy=False).x0
            pair = (ref, output.sample(n, g))
            out["floor"].append(sliced_w2(*pair, torch.Generator().manual_seed(d)))
    return out


def renormalised(rows: list[dict[str, Any]], floors: dict[int, float]) -> dict[str, Any]:
    """The goal counted with each run's W2 over its mixture's mean floor."""
    counts = {"runs": 0, "goal_one_draw": 0, "goal_mean_floor": 0, "skipped": 0}
    per_run = []
    for r in rows:
        if r["family"] not in floors or "target_sliced_w2" not in r:
            counts["skipped"] += 1  # another mixture, or a summary from before the raw W2
            continue
        ratio = r["target_sliced_w2"] / floors[r["family"]]
        meets = meets_goal({**r, "w2_over_floor": ratio})
        counts["runs"] += 1
        counts["goal_one_draw"] += bool(r["goal"])
        counts["goal_mean_floor"] += meets
        keep = {k: r[k] for k in ("family", "reward", "alpha", "value")}
        keep["w2_over_floor"] = round(r["w2_over_floor"], 3)
        per_run.append({**keep, "w2_over_mean_floor": round(ratio, 3), "goal_mean_floor": meets})
    return {**counts, "per_run": per_run}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--families", type=int, default=8, help="how many mixtures (8)")
    p.add_argument("--first-family", type=int, default=0)
    p.add_argument("--rewards", default="linear,quadratic")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--num-steps", type=int, default=200, help="the sampler's steps (200)")
    p.add_argument("--num-samples", type=int, default=4096, help="points a reading (4096)")
    p.add_argument("--draws", type=int, default=8, help="readings a mixture (8)")
    p.add_argument("--summary", action="append", default=[], metavar="SUMMARY_JSON")
    args = p.parse_args(argv)
    if args.draws < 2 or args.num_samples < 2:
        p.error(f"--draws and --num-samples must be >= 2, got {args.draws}, {args.num_samples}")
    for path in args.summary:
        if not Path(path).is_file():
            p.error(f"--summary {path}: no such file")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    families, floors = [], {}
    for i, mixture in mixtures(args.first_family, args.families).items():
        row: dict[str, Any] = {"family": i, "modes": len(mixture["means"])}
        for j, reward in enumerate(args.rewards.split(",")):
            d = readings(mixture, reward, args, floor=j == 0)  # the floor has no reward
            if j == 0:
                row["floor_mean"] = round(statistics.mean(d["floor"]), 4)
                row["floor_std"] = round(statistics.stdev(d["floor"]), 4)
            row[f"{reward}_target_noise_mean"] = round(statistics.mean(d["target_noise"]), 4)
            row[f"{reward}_target_noise_std"] = round(statistics.stdev(d["target_noise"]), 4)
        floors[i] = row["floor_mean"]
        families.append(row)
        print(json.dumps(row), flush=True)
    doc: dict[str, Any] = {"num_steps": args.num_steps, "num_samples": args.num_samples,
                           "draws": args.draws, "alpha": args.alpha, "families": families,
                           "summaries": {}}  # fmt: skip
    for path in args.summary:
        got = renormalised(json.loads(Path(path).read_text()), floors)
        if got["skipped"]:
            print(f"{path}: {got['skipped']} runs skipped (no raw W2, or a mixture not read)",
                  file=sys.stderr)  # fmt: skip
        doc["summaries"][path] = got
        print(path, {k: v for k, v in got.items() if k != "per_run"}, flush=True)
    atomic_write_text(out / "floor_noise.json", json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
