"""Does reading a consistency model at its distilled timesteps change x̂0? (docs/reproducing.md)

    python scripts/lcm_timesteps.py [--samples 128] [--json OUT]

The SQDF reference code reads its LCM at the nearest of LCMScheduler's timesteps (19, 39, ...,
999 on a 1,000-step schedule) instead of the chain's DDIM timestep (981, 961, ..., 1): at
most 2 apart, 18 at the last state. Measured here, on the states of 50-step DDIM (eta 1)
reference trajectories:

- the shipped digits consistency model (sqdf distill-cm: distilled at every integer timestep
  1..999, so the nearest of *its* timesteps is the chain's own; the 20-spaced LCM grid is
  read to see how much such a shift moves x̂0): the RMS change of x̂0, and each x̂0's RMS
  distance to the trajectory's final sample and its ink reward;
- tiny random SD parts with a random LCM UNet (sqdf.tasks.sd_random): the RMS change of x̂0
  through the sd task's own setting (lcm_timesteps = chain or distilled).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from sqdf.config.train_config import TrainConfig
from sqdf.core.x0 import nearest_timesteps
from sqdf.sampling.sampler import sample_trajectories
from sqdf.tasks import build_task


def rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).flatten(1).mean(1).sqrt().mean())


def lcm_grid(scheduler_folder: Path) -> torch.Tensor:
    from diffusers import LCMScheduler

    sched = LCMScheduler.from_pretrained(str(scheduler_folder.parent), subfolder="scheduler")
    sched.set_timesteps(sched.config.original_inference_steps)
    return sched.timesteps.long()


@torch.no_grad()
def digits(samples: int) -> dict:
    from sqdf.tasks.digits import shipped_model

    torch.manual_seed(0)
    task = build_task(TrainConfig(task="digits", num_steps=50, eta=1.0, estimator="consistency",
                                  reward="ink", device="cpu"))  # fmt: skip
    grid = lcm_grid(shipped_model() / "scheduler")
    traj = sample_trajectories(task, samples, torch.Generator().manual_seed(0), policy=False)
    final = traj.x0
    rows = []
    for state in range(1, 50):  # the state step state-1 reached; 50 is the sample itself
        x = traj.states[:, state]
        k = torch.full((samples,), state)
        t = task.model_time(k, x)
        at_chain = task.consistency_x0(x, t, traj.cond)
        at_grid = task.consistency_x0(x, nearest_timesteps(t, grid), traj.cond)
        rows.append({
            "state": state, "t_chain": int(t[0]), "t_grid": int(nearest_timesteps(t, grid)[0]),
            "rms_change": rms(at_grid - at_chain),
            "rms_to_final_chain": rms(at_chain - final), "rms_to_final_grid": rms(at_grid - final),
            "ink_chain": float(task.reward(at_chain, traj.cond).mean()),
            "ink_grid": float(task.reward(at_grid, traj.cond).mean()),
        })  # fmt: skip
    return {"samples": samples, "rows": rows}


@torch.no_grad()
def tiny_sd(samples: int) -> dict:
    from sqdf.rewards.clip_rewards import convert_aesthetic_head
    from sqdf.tasks.sd_random import (
        write_random_aesthetic_head,
        write_random_clip,
        write_random_lcm_unet,
        write_random_sd,
    )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_random_sd(root / "sd")
        write_random_clip(root / "clip")
        write_random_lcm_unet(root / "lcm")
        write_random_aesthetic_head(root / "head.pth", in_dim=16)
        convert_aesthetic_head(root / "head.pth", root / "head.safetensors")
        out = {}
        for mode in ("chain", "distilled"):
            torch.manual_seed(0)
            task = build_task(TrainConfig(
                task="sd", num_steps=50, estimator="consistency", device="cpu",
                reward="aesthetic", task_params={"model": str(root / "sd"),
                "lcm": str(root / "lcm"), "lcm_timesteps": mode},
                reward_params={"clip": str(root / "clip"),
                               "head": str(root / "head.safetensors")},
            ))  # fmt: skip
            traj = sample_trajectories(task, samples, torch.Generator().manual_seed(0),
                                       policy=False)  # fmt: skip
            xs = traj.states[:, 1:50].flatten(0, 1)
            ks = torch.arange(1, 50).repeat(samples)
            cond = traj.cond.repeat_interleave(49)
            out[mode] = task.consistency_x0(xs, task.model_time(ks, xs), cond)
            scale = rms(out[mode])
        return {"samples": samples, "rms_change": rms(out["distilled"] - out["chain"]),
                "rms_x0": scale}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = {"digits": digits(args.samples), "tiny_sd": tiny_sd(min(args.samples, 8))}
    rows = result["digits"]["rows"]
    print("digits CM, states of 50-step DDIM reference trajectories "
          f"({args.samples} samples): state, t chain -> grid, RMS change of x̂0, "
          "RMS to the final sample (chain, grid), ink of x̂0 (chain, grid)")  # fmt: skip
    for r in rows[::8] + ([rows[-1]] if (len(rows) - 1) % 8 else []):
        print(f"  {r['state']:2d}  {r['t_chain']:3d} -> {r['t_grid']:3d}  {r['rms_change']:.4f}  "
              f"{r['rms_to_final_chain']:.4f} {r['rms_to_final_grid']:.4f}  "
              f"{r['ink_chain']:.4f} {r['ink_grid']:.4f}")  # fmt: skip
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    print(
        f"  mean over states 1-49: change {mean('rms_change'):.4f}; to final "
        f"{mean('rms_to_final_chain'):.4f} (chain) {mean('rms_to_final_grid'):.4f} (grid)"
    )
    sd = result["tiny_sd"]
    print(
        f"tiny random SD + random LCM UNet: RMS change of x̂0 {sd['rms_change']:.4f} "
        f"(RMS of x̂0 {sd['rms_x0']:.4f})"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
