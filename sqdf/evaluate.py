"""Load a finished run, sample from it, score it: ``eval.json`` and sample pictures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from sqdf.atomic import atomic_write_text
from sqdf.checkpoint import load_weights
from sqdf.errors import SqdfError
from sqdf.run import read_run_config
from sqdf.sampler import Trajectories, sample_trajectories
from sqdf.tasks import Task, build_task


def final_weights(run: Path) -> Path:
    """The weights a finished run is evaluated and sampled with: the moving average
    (final/ema/, with --ema-decay) where the run kept one, else the trained weights."""
    ema = run / "final" / "ema" / "policy.safetensors"
    return ema if ema.is_file() else run / "final" / "policy.safetensors"


def load_run(run: str | Path, device: str | None = None) -> Task:
    """The task of a run folder with its fine-tuned policy weights (:func:`final_weights`)
    loaded."""
    run = Path(run)
    cfg = read_run_config(run)
    if device is not None:
        cfg.device = device
    weights = final_weights(run)
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


def sample_in_chunks(
    task: Task, n: int, seed: int, progress: Any = False, **kw: Any
) -> Trajectories:
    """n trajectories, in chunks of ``task.eval_batch`` where the task sets one (sd: a
    few images at a time fit any GPU); the same seed gives the same noise either way round."""
    chunk = task.eval_batch or n
    gen = torch.Generator().manual_seed(seed)
    if chunk >= n:
        return sample_trajectories(task, n, gen, progress=progress and f"sampling {progress}", **kw)
    cond = task.sample_conditions(n, gen)
    parts = [
        sample_trajectories(task, len(c), gen, cond=c, **kw)
        for c in tqdm(cond.split(chunk), desc=f"sampling {progress}", disable=not progress)
    ]
    kl = [t.kl for t in parts]
    return Trajectories(
        states=torch.cat([t.states for t in parts]),
        cond=cond,
        kl=torch.cat(kl) if all(k is not None for k in kl) else None,
        logp=torch.cat([t.logp for t in parts]),
    )


@torch.no_grad()
def score_samples(task: Task, x0: Tensor, cond: Tensor) -> Tensor:
    """The task's reward of samples, (N,) on the CPU, in chunks of ``task.eval_batch``."""
    chunk = task.eval_batch or len(x0)
    dev = task.device
    return torch.cat([
        task.reward(x.to(dev), c.to(dev)).cpu()
        for x, c in zip(x0.split(chunk), cond.split(chunk), strict=True)
    ])  # fmt: skip


# the evaluation's noise: every run (and sqdf compare's best-of-N) is scored on the same draws
EVAL_SEED = 1234


def evaluate_run(
    run: str | Path,
    num_samples: int | None = None,
    seed: int = EVAL_SEED,
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
    traj = sample_in_chunks(
        task, num_samples, seed, with_kl=True, progress=progress and "fine-tuned"
    )
    ref = sample_in_chunks(task, num_samples, seed, policy=False, progress=progress and "reference")
    gen = torch.Generator().manual_seed(seed + 1)
    r, r_ref = score_samples(task, traj.x0, traj.cond), score_samples(task, ref.x0, ref.cond)
    assert traj.kl is not None
    metrics: dict[str, Any] = {
        "weights": final_weights(run).parent.name,  # "final", or "ema" for the moving average
        "num_samples": num_samples,
        "seed": seed,
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std()),
        "kl_path": float(traj.kl.sum(dim=1).mean()),
        "ref_reward_mean": float(r_ref.mean()),
        "ref_reward_std": float(r_ref.std()),
    }
    metrics.update(task.evaluate(traj.x0, ref.x0, traj.cond, gen))
    atomic_write_text(run / "eval.json", json.dumps(metrics, indent=1))
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
