"""Load a finished run, sample from it, score it: ``eval.json`` and sample pictures."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from sqdf.errors import ConfigError, SqdfError
from sqdf.evaluation.heldout import (
    cross_rewards,
    eval_markdown,
    evaluate_prompts,
    image_features,
    reward_inputs,
    score_rewards,
)
from sqdf.infra.atomic import atomic_write_text, make_folder
from sqdf.infra.checkpoint import load_weights
from sqdf.rewards import mixture_components
from sqdf.run.folder import read_metrics, read_run_config
from sqdf.sampling.sampler import Trajectories, sample_in_chunks, sample_trajectories
from sqdf.tasks import Task, build_task, resolved_reward_name


def final_weights(run: Path) -> Path:
    """The weights a finished run is evaluated and sampled with: the moving average
    (final/ema/, with --ema-decay) where the run kept one, else the trained weights."""
    ema = run / "final" / "ema" / "policy.safetensors"
    return ema if ema.is_file() else run / "final" / "policy.safetensors"


def trained_updates(run: Path) -> int:
    """The updates a run's final weights were trained for: the last metrics row's step (a
    run logs its last update whatever log_every says)."""
    rows = read_metrics(run)
    return int(rows[-1]["step"]) if rows else 0


def load_run(
    run: str | Path, device: str | None = None, overrides: dict[str, Any] | None = None
) -> Task:
    """The task of a run folder with its fine-tuned policy weights (:func:`final_weights`)
    loaded; ``overrides``: parameter tables over the run's own (``read_run_config``)."""
    run = Path(run)
    cfg = read_run_config(run, overrides)
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


@torch.no_grad()
def score_samples(task: Task, x0: Tensor, cond: Tensor) -> Tensor:
    """The task's reward of samples as evaluation reports it (``eval_reward``), (N,) on the
    CPU, in chunks of ``task.eval_batch``."""
    chunk = task.eval_batch or len(x0)
    dev = task.device
    return torch.cat([
        task.eval_reward(x.to(dev), c.to(dev)).cpu()
        for x, c in zip(x0.split(chunk), cond.split(chunk), strict=True)
    ])  # fmt: skip


# the evaluation's noise: every run (and sqdf compare's best-of-N) is scored on the same draws
EVAL_SEED = 1234
PER_PROMPT = 4  # sd: held-out images per prompt


def sample_reference(
    task: Task, num_samples: int, seed: int = EVAL_SEED, progress: bool = False
) -> Trajectories:
    """The reference's evaluation samples: the noise and conditions ``seed`` draws, which the
    fine-tuned policy is sampled from too. They depend on the base model only, so runs of one
    base can share them (``evaluate_run``'s ``reference``)."""
    return sample_in_chunks(
        task, num_samples, seed, policy=False, progress=progress and "reference"
    )


def evaluate_run(
    run: str | Path,
    num_samples: int | None = None,
    seed: int = EVAL_SEED,
    device: str | None = None,
    progress: bool = False,
    *,
    rewards: Mapping[str, Mapping[str, Any]] | None = None,
    prompts: str | None = None,
    per_prompt: int | None = None,
    clip: str | None = None,
    lpips: str | bool | None = None,
    dreamsim: str | bool | None = None,
    dreamsim_type: str | None = None,
    fid: str | bool | None = None,
    overrides: dict[str, Any] | None = None,
    reference: Trajectories | None = None,
) -> dict[str, Any]:
    """Sample the fine-tuned policy and the reference, compute metrics, write ``eval.json``.

    ``num_samples`` defaults to the task's (gmm2d 4096, digits 1000). ``rewards`` (name ->
    parameters) are scored beside the trained one (cross-rewards). An sd run is evaluated on
    held-out prompts instead (``prompts``: a set or a file, default the run's
    ``eval_prompts``), ``per_prompt`` images each (4), with diversity on ``clip``'s features
    (sqdf.evaluation.heldout); it also writes ``eval.md``. ``lpips`` and ``dreamsim`` add those
    diversities and ``fid`` the FID on Inception features to the reference images: each True for its
    package's default weights or a local path (sqdf.evaluators.image_metrics; ``dreamsim_type``
    picks DreamSim's model). ``overrides``: parameter tables over the run's own
    (``read_run_config``). ``reference``: the reference's samples for this seed and sample
    count (:func:`sample_reference`), when another run of the same base already drew them."""
    from sqdf.evaluators.image_metrics import ImageMetricRequest

    run = Path(run)
    cfg = read_run_config(run, overrides)
    request = ImageMetricRequest(lpips, dreamsim, dreamsim_type, fid)
    if cfg.task == "sd":  # the options are checked before the model loads
        if reference is not None:
            raise ConfigError("reference samples are not shared between sd evaluations")
        if num_samples is not None:
            raise ConfigError(
                "an sd run is evaluated per prompt: give --per-prompt (images per prompt) "
                "instead of --num-samples"
            )
        if prompts is not None:
            from sqdf.tasks.sd_prompts import load_prompt_pairs

            load_prompt_pairs(prompts)
        _check_image_metrics(request, cfg)
    else:
        given = (("--prompts", prompts), ("--per-prompt", per_prompt), ("--clip", clip),
                 *request.flags().items(), ("--dreamsim-type", dreamsim_type))  # fmt: skip
        for flag, value in given:
            if value is not None:
                raise ConfigError(f"{flag} is for sd runs; {run} is a {cfg.task} run")
    task = load_run(run, device, overrides)
    trained = resolved_reward_name(cfg)
    extra = cross_rewards(cfg.task, trained, rewards or {}, task.device)
    if cfg.task == "sd":
        metrics = _evaluate_sd(task, run, extra, trained, prompts, per_prompt or PER_PROMPT,
                               seed, clip, request, progress)  # fmt: skip
        if overrides:
            metrics["overrides"] = overrides
        atomic_write_text(run / "eval.json", json.dumps(metrics, indent=1))
        title = f"Held-out evaluation of {run.name}"
        atomic_write_text(run / "eval.md", eval_markdown(metrics, title))
        return metrics
    num_samples = task.eval_samples if num_samples is None else num_samples
    if num_samples < 2:
        raise SqdfError(f"num_samples must be >= 2, got {num_samples}")
    # The same seed for both: the reference starts from the same noise and conditions, so
    # the two sample sets differ only by the fine-tuning.
    traj = sample_in_chunks(
        task, num_samples, seed, with_kl=True, progress=progress and "fine-tuned"
    )
    if reference is None:
        ref = sample_reference(task, num_samples, seed, progress)
    elif len(reference.cond) != num_samples or not torch.equal(reference.cond, traj.cond):
        raise SqdfError(
            f"the reference samples given ({len(reference.cond)}) were not drawn for this "
            f"evaluation ({num_samples} samples, seed {seed})"
        )
    else:
        ref = reference
    gen = torch.Generator().manual_seed(seed + 1)
    r, r_ref = score_samples(task, traj.x0, traj.cond), score_samples(task, ref.x0, ref.cond)
    assert traj.kl is not None
    metrics: dict[str, Any] = {
        "weights": final_weights(run).parent.name,  # "final", or "ema" for the moving average
        "updates": trained_updates(run),
        "num_samples": num_samples,
        "seed": seed,
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std()),
        "kl_path": float(traj.kl.sum(dim=1).mean()),
        "ref_reward_mean": float(r_ref.mean()),
        "ref_reward_std": float(r_ref.std()),
    }
    metrics.update(task.evaluate(traj.x0, ref.x0, traj.cond, gen))
    parts = mixture_components(task.reward_model)  # a mixture's rewards, each on its own
    scored = {**parts, **extra}
    if scored:
        ours = score_rewards(task, scored, reward_inputs(task, traj.x0), traj.cond)
        theirs = score_rewards(task, scored, reward_inputs(task, ref.x0), ref.cond)
        metrics["rewards"] = {
            name: {"mean": float(ours[name].mean()), "ref_mean": float(theirs[name].mean()),
                   "trained": name in parts,
                   **({"weight": task.reward_model.weights[name]} if name in parts else {})}
            for name in scored
        }  # fmt: skip
    if overrides:  # what was measured is not the run as trained: eval.json says so
        metrics["overrides"] = overrides
    atomic_write_text(run / "eval.json", json.dumps(metrics, indent=1))
    return metrics


def _evaluate_sd(
    task: Task,
    run: Path,
    extra: dict[str, Any],
    trained: str,
    prompts: str | None,
    per_prompt: int,
    seed: int,
    clip: str | None,
    request: Any,
    progress: bool,
) -> dict[str, Any]:
    from sqdf.evaluators.image_metrics import load_image_metrics
    from sqdf.tasks.sd_prompts import load_prompt_pairs

    spec = prompts or task.options.eval_prompts
    pairs = load_prompt_pairs(spec)
    rewards = {trained: task.reward_model, **mixture_components(task.reward_model), **extra}
    image_metrics = load_image_metrics(request, task.device, progress)
    metrics: dict[str, Any] = {
        "weights": final_weights(run).parent.name,
        "updates": trained_updates(run),
        "prompts": spec,
        "num_prompts": len(pairs),
        "images_per_prompt": per_prompt,
        "num_samples": len(pairs) * per_prompt,
        "seed": seed,
        # held-out prompts the run nevertheless trained on (a prompts file shared by both)
        "trained_prompts_among_them": sorted(
            {p for p, _ in pairs} & set(task.prompts[: task.train_prompts])
        ),
        **{name: image_metrics.described.get(name, f"not computed (no --{name})")
           for name in ("lpips", "dreamsim", "fid")},
    }  # fmt: skip
    metrics.update(
        evaluate_prompts(
            task, pairs, rewards=rewards, trained=trained, per_prompt=per_prompt, seed=seed,
            features=image_features(rewards, clip, task.device),
            distances=image_metrics.diversity, fid=image_metrics.fid, progress=progress,
        )
    )  # fmt: skip
    return metrics


def _check_image_metrics(request: Any, cfg: Any) -> None:
    """Packages, weight files and image size of the requested image metrics, before the model
    loads and anything is sampled."""
    from sqdf.config.params import build_settings
    from sqdf.evaluators.image_metrics import check_request
    from sqdf.tasks.sd import SDConfig, image_side

    check_request(
        request, lambda: image_side(build_settings(SDConfig, cfg.task_params, "task 'sd'"))
    )


def sample_run(
    run: str | Path,
    num_samples: int = 1024,
    seed: int = 0,
    out: str | Path | None = None,
    with_reference: bool = True,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Sample a run's policy; save the samples (safetensors) and a picture; return its path.
    ``overrides``: parameter tables over the run's own (``read_run_config``)."""
    if num_samples < 1:
        raise SqdfError(f"num_samples must be >= 1, got {num_samples}")
    run = Path(run)
    if out is not None:  # a place that cannot take the picture is found before sampling
        make_folder(Path(out).parent, "folder")
    task = load_run(run, overrides=overrides)
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
