"""How well Hutchinson probes read the trace behind ``--q-cov isotropic``, on the digits model.

    python benchmarks/posterior_trace.py --out benchmarks/results/posterior-trace-digits.json

Samples ``--samples`` reference chains, and at each of ``--steps`` reads the trace of
J = ∂x̂0/∂x at the state the step reached twice: exactly (one backward pass per pixel) and by
``--repeats`` single Rademacher probes zᵀ J z. Reports, per step, the one-probe reading's
relative standard deviation |std / tr J| (median and range over the states) and how many
states have a negative trace (an inexact denoiser's Jacobian: there the isotropic variance is
clamped to 0 and the soft value is Tweedie's). P probes divide the standard deviation by √P.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_speed import command_line, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=8, help="reference chains (8)")
    ap.add_argument("--steps", default="2,10,25,45", help="step indices k, comma-separated")
    ap.add_argument("--repeats", type=int, default=64, help="single probes per state (64)")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = ap.parse_args(argv)
    import torch

    from sqdf.run.settings import make_config
    from sqdf.sampling.sampler import sample_trajectories
    from sqdf.tasks import build_task

    cfg = make_config(
        {"task": "digits", "method": "sqdf", "estimator": "tweedie", "device": "cpu"},
        source="bench",
    )  # fmt: skip
    task = build_task(cfg)
    steps = [int(v) for v in args.steps.split(",")]
    bad = [k for k in steps if not 0 <= k < cfg.num_steps - 1]
    if bad or args.samples < 1 or args.repeats < 2:
        ap.error(
            f"--steps must lie in [0, {cfg.num_steps - 2}] (got {args.steps}), --samples >= 1 "
            f"and --repeats >= 2"
        )
    g = torch.Generator().manual_seed(0)
    traj = sample_trajectories(task, args.samples, g)
    rows = []
    for k in steps:
        state = torch.full((args.samples,), k + 1)
        x = traj.states[:, k + 1].clone().requires_grad_(True)
        mean = task.reference_x0(x, state, traj.cond).flatten(1)
        eye = torch.eye(mean.shape[1])
        trace = torch.stack([
            (torch.autograd.grad(mean, x, grad_outputs=e.expand_as(mean), retain_graph=True)[0]
             .flatten(1)[:, i])
            for i, e in enumerate(eye)
        ]).sum(0)  # fmt: skip
        reads = []
        for _ in range(args.repeats):
            z = 2.0 * torch.randint(0, 2, mean.shape, generator=g) - 1.0
            (vjp,) = torch.autograd.grad(mean, x, grad_outputs=z, retain_graph=True)
            reads.append((vjp.flatten(1) * z).sum(1))
        rel = torch.stack(reads).std(0) / trace.abs()
        row = {
            "step": k, "trace_mean": round(float(trace.mean()), 3),
            "negative_traces": int((trace < 0).sum()), "states": args.samples,
            "one_probe_rel_std_median": round(float(rel.median()), 3),
            "one_probe_rel_std_min": round(float(rel.min()), 3),
            "one_probe_rel_std_max": round(float(rel.max()), 3),
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    doc = {
        "date": time.strftime("%Y-%m-%d"), "task": "digits", "num_steps": cfg.num_steps,
        "dimensions": int(mean.shape[1]), "repeats": args.repeats,
        "command": command_line(__file__, argv),
        "rows": rows,
    }  # fmt: skip
    write_json(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
