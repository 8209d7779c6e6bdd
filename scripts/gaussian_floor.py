"""The Gaussian-step floor on the random mixtures of scripts/gmm_families.py: no training,
the chain whose every step is a fixed-variance Gaussian chosen with the exact soft value
(sqdf.evaluation.gaussian_floor), measured against each mixture's exact target and the goal as the
trained runs are.

    .venv/bin/python scripts/gaussian_floor.py --out runs/results/gmm2d-families-floor \
        --projections sqdf,first_order,moment --num-steps 50,200

On the flow path: --task-param process=flow --task-param noise_level=1.4142135623730951 (the
exact soft value is the flow sampler's at its full noise level, √2).

Projections: sqdf, the optimum of SQDF's per-step objective with the exact soft value (what
a perfectly trained policy of fixed-variance Gaussian steps takes); first_order, its
first-order step μ + (σ²/α) ∇V(μ); moment, the tilted step's mean. Writes OUT/summary.md,
OUT/summary.json and OUT/families.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/gmm_families.py

from gmm_families import distances, meets_goal, mixtures, summary_markdown  # noqa: E402

from sqdf.commands.args import key_values  # noqa: E402
from sqdf.evaluation.gaussian_floor import PROJECTIONS, measure_gaussian_floor  # noqa: E402
from sqdf.infra.atomic import atomic_write_text  # noqa: E402
from sqdf.run.settings import make_config  # noqa: E402
from sqdf.tasks import build_task  # noqa: E402

SWEEP_KEY = "Gaussian step, sampling steps"


def floor_rows(
    args: argparse.Namespace, mixture: dict, family: int, reward: str, alpha: float,
    num_steps: int, projection: str,
) -> list[dict]:  # fmt: skip
    """One mixture's floor runs (one per seed), as summary rows."""
    cfg = make_config({
        "task": "gmm2d", "reward": reward, "alpha": alpha, "gamma": 1.0,
        "estimator": "exact", "num_steps": num_steps,
        "task_params": {**key_values(args.task_param, "--task-param"), **mixture},
    }, source="gaussian_floor")  # fmt: skip
    task = build_task(cfg)
    rows = []
    for seed in range(args.seeds):
        run = measure_gaussian_floor(
            task, args.samples, seed, projection=projection, iters=args.iters,
            points=args.points,
        )  # fmt: skip
        d = distances(run)
        rows.append({
            "family": family, "modes": len(mixture["means"]), "reward": reward,
            "alpha": alpha, "value": f"{projection}, {num_steps}", "seed": seed,
            "kl_path": run["kl_path"], "fixed_point_change": run["fixed_point_change"], **d,
            "goal": meets_goal(d),
        })  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--families", type=int, default=4, help="how many mixtures")
    p.add_argument("--first-family", type=int, default=0, help="index of the first mixture")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--alphas", default="1.0", help="KL weights, comma-separated")
    p.add_argument("--rewards", default="linear,quadratic")
    p.add_argument("--projections", default=",".join(PROJECTIONS))
    p.add_argument("--num-steps", default="50,200")
    p.add_argument("--samples", type=int, default=4096, help="as sqdf eval measures a run")
    p.add_argument("--iters", type=int, default=4, help="fixed-point iterations (sqdf)")
    p.add_argument("--points", type=int, default=5, help="Gauss-Hermite nodes a dimension")
    p.add_argument(
        "--task-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a gmm2d task parameter besides the mixture (process=flow)",
    )
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    families = mixtures(args.first_family, args.families)
    atomic_write_text(
        out / "families.json",
        json.dumps([{"index": i, **m} for i, m in families.items()], indent=1),
    )
    rows = []
    alphas = [float(v) for v in args.alphas.split(",")]
    for num_steps in (int(v) for v in args.num_steps.split(",")):
        for projection in args.projections.split(","):
            for alpha in alphas:
                for i, mixture in families.items():
                    for reward in args.rewards.split(","):
                        rows += floor_rows(args, mixture, i, reward, alpha, num_steps, projection)
                        print(f"{projection} {num_steps} alpha {alpha} family{i} {reward} done",
                              flush=True)  # fmt: skip
            atomic_write_text(out / "summary.json", json.dumps(rows, indent=1))
    atomic_write_text(out / "summary.md", summary_markdown(rows, SWEEP_KEY))
    print(summary_markdown(rows, SWEEP_KEY))


if __name__ == "__main__":
    main()
