"""How far each training-free soft value's gradient is from the exact one's, on gmm2d.

    python benchmarks/posterior_gradient.py --out benchmarks/results/posterior-gradient-gmm2d.json

SQDF's loss reaches the policy through ∇Q at the state a step reached, so this compares
gradients, not values. On ``--samples`` states of reference chains after each of ``--steps``
(default mixture, VP path, alpha ``--alpha``), for each reward: Tweedie's r(x̂0); the Gaussian
posterior with the full covariance (whose graph is kept); the isotropic one with its trace
held fixed (``--q-cov isotropic``) and with the trace's own gradient kept
(``tweedie_isotropic_variance(keep_graph=True)``, a double backward pass), at each of
``--probes`` (the same probes for both). Reports each one's gradient error relative to the
exact soft value's, mean ‖∇Q − ∇V‖ / mean ‖∇V‖ over the states, and its value's mean error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_speed import command_line, write_json  # noqa: E402


def soft_values(task, x, step, cond, probes: list[int], g) -> dict:
    """Each estimator's soft value of the states x reached by step k, differentiable in x."""
    import torch

    from sqdf.core.gaussian_q import (
        gaussian_soft_value,
        isotropic_soft_value,
        tweedie_covariance,
        tweedie_isotropic_variance,
    )

    x0_fn, reward_fn, scale, spread = task.posterior_parts(x, step, cond)
    z = torch.randn((len(x), task.q_draws, x.shape[1]), generator=g)

    # the same probes with the trace's gradient held and kept: the difference is that gradient
    signs = {p: torch.randint(0, 2, (len(x), p, x.shape[1]), generator=g) for p in probes}

    def isotropic(p: int, keep: bool) -> torch.Tensor:
        mean, var = tweedie_isotropic_variance(
            x0_fn, x, scale, spread, 2.0 * signs[p] - 1.0, keep_graph=keep
        )
        return isotropic_soft_value(reward_fn, mean, var, task.alpha, z)

    cov = tweedie_covariance(x0_fn, x, scale, spread)
    return {
        "exact": task.soft_q(x, step, cond),
        "tweedie": task.reward(x0_fn(x), cond),
        "full": gaussian_soft_value(reward_fn, *cov, task.alpha, z),
        **{f"isotropic-{p}": isotropic(p, False) for p in probes},
        **{f"isotropic_grad-{p}": isotropic(p, True) for p in probes},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=256, help="reference chains (256)")
    ap.add_argument("--steps", default="5,20,35", help="step indices k, comma-separated")
    ap.add_argument("--rewards", default="linear,quadratic")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--probes", default="1,4", help="Hutchinson probe counts, comma-separated")
    ap.add_argument("--draws", type=int, default=16, help="Gaussian draws per value (16)")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = ap.parse_args(argv)
    import torch

    from sqdf.run.settings import make_config
    from sqdf.sampling.sampler import sample_trajectories
    from sqdf.tasks import build_task

    steps = [int(v) for v in args.steps.split(",")]
    probes = [int(v) for v in args.probes.split(",")]
    if args.samples < 1 or args.draws < 1 or min(probes) < 1 or not args.alpha > 0:
        ap.error("--samples, --draws and every --probes must be >= 1 and --alpha > 0")
    rows = []
    for reward in args.rewards.split(","):
        cfg = make_config(
            {"task": "gmm2d", "method": "sqdf", "estimator": "exact", "gamma": 1.0,
             "reward": reward, "alpha": args.alpha, "q_draws": args.draws, "device": "cpu"},
            source="bench",
        )  # fmt: skip
        task = build_task(cfg)
        if any(not 0 <= k < cfg.num_steps - 1 for k in steps):
            ap.error(f"--steps must lie in [0, {cfg.num_steps - 2}], got {args.steps}")
        g = torch.Generator().manual_seed(0)
        traj = sample_trajectories(task, args.samples, g, policy=False)
        for k in steps:
            x = traj.states[:, k + 1].detach().clone().requires_grad_(True)
            values = soft_values(task, x, torch.full((args.samples,), k), traj.cond, probes, g)
            grads = {
                name: torch.autograd.grad(v.sum(), x, retain_graph=True)[0]
                for name, v in values.items()
            }
            exact_norm = grads["exact"].norm(dim=1).mean()
            for name, grad in grads.items():
                if name == "exact":
                    continue
                error = (grad - grads["exact"]).norm(dim=1).mean() / exact_norm
                row = {
                    "reward": reward, "step": k, "estimator": name,
                    "grad_rel_error": round(float(error), 4),
                    "value_bias": round(float((values[name] - values["exact"]).mean().detach()), 4),
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    doc = {
        "date": time.strftime("%Y-%m-%d"), "task": "gmm2d", "alpha": args.alpha,
        "samples": args.samples, "draws": args.draws,
        "command": command_line(__file__, argv),
        "rows": rows,
    }  # fmt: skip
    write_json(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
