"""Load a finished run, sample from it, score it: ``eval.json`` and sample pictures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sqdf.checkpoint import load_weights
from sqdf.errors import SqdfError
from sqdf.run import read_run_config
from sqdf.sampler import sample_trajectories
from sqdf.tasks import Task, build_task


def load_run(run: str | Path, device: str | None = None) -> Task:
    """The task of a run folder with its fine-tuned policy weights loaded."""
    run = Path(run)
    cfg = read_run_config(run)
    if device is not None:
        cfg.device = device
    weights = run / "final" / "policy.safetensors"
    if not weights.is_file():
        raise SqdfError(
            f"run {run} has no final weights (final/policy.safetensors); "
            f"finish it with: sqdf train --resume {run}"
        )
    task = build_task(cfg)
    try:
        task.policy.load_state_dict(load_weights(weights))
    except Exception as err:  # corrupt file or foreign weights: one line, not a traceback
        first = str(err).splitlines()[0]
        raise SqdfError(f"final weights of {run} do not fit its config: {first}") from None
    task.policy.eval()
    return task


def evaluate_run(
    run: str | Path,
    num_samples: int | None = None,
    seed: int = 1234,
    device: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Sample the fine-tuned policy and the reference, compute metrics, write ``eval.json``.

    ``num_samples`` defaults to the task's (gmm2d 4096, digits 1000)."""
    run = Path(run)
    task = load_run(run, device)
    num_samples = task.eval_samples if num_samples is None else num_samples
    if num_samples < 2:
        raise SqdfError(f"num_samples must be >= 2, got {num_samples}")
    # The same seed for both: the reference starts from the same noise and conditions, so
    # the two sample sets differ only by the fine-tuning.
    traj = sample_trajectories(
        task,
        num_samples,
        torch.Generator().manual_seed(seed),
        with_kl=True,
        progress="sampling fine-tuned" if progress else None,
    )
    ref = sample_trajectories(
        task,
        num_samples,
        torch.Generator().manual_seed(seed),
        policy=False,
        progress="sampling reference" if progress else None,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    dev = task.device
    with torch.no_grad():
        r = task.reward(traj.x0.to(dev), traj.cond.to(dev)).cpu()
        r_ref = task.reward(ref.x0.to(dev), ref.cond.to(dev)).cpu()
    assert traj.kl is not None
    metrics: dict[str, Any] = {
        "num_samples": num_samples,
        "seed": seed,
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std()),
        "kl_path": float(traj.kl.sum(dim=1).mean()),
        "ref_reward_mean": float(r_ref.mean()),
        "ref_reward_std": float(r_ref.std()),
    }
    metrics.update(task.evaluate(traj.x0, ref.x0, traj.cond, gen))
    (run / "eval.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def sample_run(
    run: str | Path,
    num_samples: int = 1024,
    seed: int = 0,
    out: str | Path | None = None,
    with_reference: bool = True,
) -> Path:
    """Sample a run's policy; save the samples (safetensors) and a picture; return its path."""
    if num_samples < 1:
        raise SqdfError(f"num_samples must be >= 1, got {num_samples}")
    run = Path(run)
    task = load_run(run)
    traj = sample_trajectories(task, num_samples, torch.Generator().manual_seed(seed))
    x0 = traj.x0
    ref = None
    if with_reference:  # from the same noise, so a sample and its reference sit side by side
        ref = sample_trajectories(
            task, num_samples, torch.Generator().manual_seed(seed), policy=False
        ).x0
    picture = Path(out) if out is not None else run / "samples.png"
    picture.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"samples": x0.contiguous()}
    if ref is not None:
        tensors["reference"] = ref.contiguous()
    save_file(tensors, str(picture.with_suffix(".safetensors")))
    task.plot_samples(x0, ref, traj.cond, picture)
    return picture
