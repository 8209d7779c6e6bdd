"""Held-out evaluation of an sd run, as the paper judges over-optimisation: prompts the run did
not train on, several images per prompt from fixed seeds, the fine-tuned policy and the
reference from the same noise; scored by the trained reward and by rewards it was not trained
on (cross-rewards), with diversity within each prompt, the Fréchet distance between the
fine-tuned and the reference images' features (how far the distribution moved) and the
path KL, per prompt and on average; LPIPS and DreamSim diversity and FID on Inception features
where asked for (sqdf.evaluators.image_metrics).

Cross-rewards are scored on every task (``cross_rewards``, ``score_rewards``); prompts are
the sd task's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sqdf.errors import ConfigError, SqdfError
from sqdf.evaluators.feature_stats import frechet_distance, mean_pairwise_distance
from sqdf.sampling.sampler import sample_in_chunks

Features = Callable[[Tensor], Tensor]  # images (N, 3, H, W) in [0, 1] -> (N, D) on the CPU
# name -> mean pairwise distance of a set of images; rows get "<name>_diversity"
Distances = Mapping[str, Callable[[Tensor], float]]
FID = Callable[[Tensor, Tensor], float]  # (fine-tuned images, reference images) -> FID
# eval.md's words for each image metric's diversity
DIVERSITY_LABELS = {"lpips": "LPIPS diversity", "dreamsim": "DreamSim diversity"}
FID_LABEL = "FID (Inception) to the reference images"
# what each task's samples are to a reward (sqdf.rewards' ``domain``)
# (sd takes no "image" cross-rewards: those score 1-channel digits)
TASK_DOMAINS = {
    "gmm2d": ("points", "any"),
    "digits": ("image", "pixels", "any"),
    "sd": ("rgb", "pixels", "any"),
}


def cross_rewards(
    task_name: str, trained: str, requested: Mapping[str, Mapping[str, Any]], device: Any
) -> dict[str, Any]:
    """The rewards named in ``requested`` (name -> parameters), built and moved to
    ``device``; the trained reward's name is skipped (it is scored anyway). A reward of
    another kind of sample than the task's is one line naming both."""
    from sqdf.rewards import build_reward, reward_domain

    out = {}
    from sqdf.rewards.mixture import parse_mixture

    scored = {trained, *(parse_mixture(trained) or {})}  # a mixture's rewards are scored anyway
    for name, params in requested.items():
        if name in scored:
            continue
        domain = reward_domain(name)  # before the reward loads its weights
        if domain not in TASK_DOMAINS.get(task_name, ("any",)):
            raise ConfigError(
                f"reward {name!r} scores {domain} samples, not what the {task_name} task makes "
                f"({TASK_DOMAINS[task_name][0]})"
            )
        reward = build_reward(name, params)
        if hasattr(reward, "to"):
            reward.to(device)
        out[name] = reward
    return out


@torch.no_grad()
def reward_inputs(task: Any, x0: Tensor) -> Tensor:
    """What the rewards score (sd: decoded images in [0, 1]), on the CPU, in chunks of the
    task's evaluation batch."""
    chunk = task.eval_batch or len(x0)
    return torch.cat([task.reward_input(x.to(task.device)).float().cpu() for x in x0.split(chunk)])


@torch.no_grad()
def score_rewards(
    task: Any, rewards: Mapping[str, Any], inputs: Tensor, cond: Tensor
) -> dict[str, Tensor]:
    """Each reward of ``inputs`` (from :func:`reward_inputs`) for conditions ``cond``: name ->
    (N,) on the CPU."""
    chunk = task.eval_batch or len(inputs)
    out = {}
    for name, reward in rewards.items():
        parts = []
        for x, c in zip(inputs.split(chunk), cond.split(chunk), strict=True):
            value = reward(x.to(task.device), task.reward_conditions(c.to(task.device)))
            parts.append(torch.as_tensor(value).float().reshape(-1).cpu())
        out[name] = torch.cat(parts)
    return out


def image_features(
    rewards: Mapping[str, Any], clip: str | None, device: Any = "cpu"
) -> tuple[Features, str]:
    """(features of images, what they are) for diversity and the Fréchet distance: CLIP image
    features of the ``clip`` folder, else of the first reward that has a CLIP model, else
    32×32 pixels."""
    from sqdf.rewards.clip_rewards import ClipModel

    model, name = None, ""
    if clip is not None:
        from sqdf.infra.weights import resolve

        local = resolve(clip, "--clip")
        if not (Path(local) / "config.json").is_file():
            raise ConfigError(f"--clip {clip!r} is not a model folder (no config.json)")
        clip = local
        model, name = ClipModel(Path(clip), device), f"CLIP image features ({clip})"
    else:
        for reward_name, reward in rewards.items():
            if getattr(reward, "clip_model", None) is not None:
                model = reward.clip_model
                name = f"CLIP image features (of reward {reward_name})"
                break
    if model is None:
        return _pixels, "32x32 pixels (no CLIP model: give --clip FOLDER for CLIP features)"

    @torch.no_grad()
    def clip_features(images: Tensor) -> Tensor:
        return torch.cat([model.image_features(x).cpu() for x in images.split(16)])

    return clip_features, name


def _pixels(images: Tensor) -> Tensor:
    small = torch.nn.functional.interpolate(images, size=(32, 32), mode="area")
    return small.flatten(1)


def prompt_table(
    prompts: list[str],
    per_prompt: int,
    scores: Mapping[str, tuple[Tensor, Tensor]],
    kl: Tensor,
    features: tuple[Tensor, Tensor],
    distances: Distances | None = None,
    images: tuple[Tensor, Tensor] | None = None,
) -> list[dict[str, Any]]:
    """One row per prompt: each reward's mean (fine-tuned, reference), the path KL, and the
    diversity within the prompt's images (mean pairwise feature distance; each of
    ``distances``, e.g. LPIPS, too). Samples are grouped by prompt: ``per_prompt`` consecutive
    ones each.

    # scores: name -> ((N,), (N,)); kl: (N,); features: ((N, D), (N, D)); N = P * per_prompt
    """
    rows = []
    for i, prompt in enumerate(prompts):
        part = slice(i * per_prompt, (i + 1) * per_prompt)
        row: dict[str, Any] = {
            "prompt": prompt,
            "kl_path": float(kl[part].mean()),
            "diversity": mean_pairwise_distance(features[0][part]),
            "ref_diversity": mean_pairwise_distance(features[1][part]),
        }
        for name, distance in (distances or {}).items():
            if images is not None:
                row[f"{name}_diversity"] = distance(images[0][part])
                row[f"ref_{name}_diversity"] = distance(images[1][part])
        row["rewards"] = {
            name: {"fine_tuned": float(ft[part].mean()), "reference": float(ref[part].mean())}
            for name, (ft, ref) in scores.items()
        }
        rows.append(row)
    return rows


def summarise(
    rows: list[dict[str, Any]], scores: Mapping[str, tuple[Tensor, Tensor]], trained: str
) -> dict[str, Any]:
    """Means over every image (rewards, with std) and over prompts (diversities, KL)."""
    ft, ref = scores[trained]
    out: dict[str, Any] = {
        "reward": trained,
        "reward_mean": float(ft.mean()),
        "reward_std": float(ft.std()),
        "ref_reward_mean": float(ref.mean()),
        "ref_reward_std": float(ref.std()),
        "kl_path": sum(r["kl_path"] for r in rows) / len(rows),
        "eval_diversity": sum(r["diversity"] for r in rows) / len(rows),
        "ref_eval_diversity": sum(r["ref_diversity"] for r in rows) / len(rows),
        "rewards": {
            name: {"mean": float(a.mean()), "ref_mean": float(b.mean()), "trained": name == trained}
            for name, (a, b) in scores.items()
        },
    }
    for name in DIVERSITY_LABELS:
        if rows and f"{name}_diversity" in rows[0]:
            for key in (f"{name}_diversity", f"ref_{name}_diversity"):
                out[key] = sum(r[key] for r in rows) / len(rows)
    return out


def heldout_conditions(task: Any, pairs: list[tuple[str, str | None]], per_prompt: int) -> Tensor:
    """The condition of every held-out image: ``per_prompt`` consecutive ones per pair."""
    if per_prompt < 2:
        raise SqdfError(f"images per prompt must be >= 2 (diversity needs pairs), got {per_prompt}")
    if not pairs:
        raise SqdfError("no prompts to evaluate")
    return task.add_prompts(pairs).repeat_interleave(per_prompt)


def scored_side(
    task: Any, rewards: Mapping[str, Any], images: Tensor, cond: Tensor, features: Features
) -> dict[str, Any]:
    """One side's (fine-tuned or reference) images with their features and reward scores."""
    return {
        "images": images,
        "features": features(images),
        "scores": score_rewards(task, rewards, images, cond),
    }


def compare_sides(
    pairs: list[tuple[str, str | None]],
    per_prompt: int,
    ours: Mapping[str, Any],
    ref: Mapping[str, Any],
    kl: Tensor,
    trained: str,
    features: str,
    distances: Distances | None = None,
    fid: FID | None = None,
) -> dict[str, Any]:
    """The held-out metrics of two sides (:func:`scored_side`) drawn for the same conditions:
    summary, Fréchet distance (and FID where ``fid`` is given) and per-prompt rows. ``kl``:
    (N,) path KL per image."""
    both = {name: (ours["scores"][name], ref["scores"][name]) for name in ours["scores"]}
    rows = prompt_table(
        [p for p, _ in pairs], per_prompt, both, kl, (ours["features"], ref["features"]),
        distances, (ours["images"], ref["images"]),
    )  # fmt: skip
    out = summarise(rows, both, trained)
    out["diversity_features"] = features
    out["frechet_to_reference"] = frechet_distance(ours["features"], ref["features"])
    if fid is not None:
        out["fid_inception_to_reference"] = fid(ours["images"], ref["images"])
    out["per_prompt"] = rows
    return out


def evaluate_prompts(
    task: Any,
    pairs: list[tuple[str, str | None]],
    *,
    rewards: Mapping[str, Any],
    trained: str,
    per_prompt: int,
    seed: int,
    features: tuple[Features, str],
    distances: Distances | None = None,
    fid: FID | None = None,
    reference: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Sample ``per_prompt`` images for each (prompt, negative) pair from the policy and the
    reference on the same noise; score, compare and tabulate them (see the module docstring).
    ``rewards`` includes the trained one, under ``trained``. ``reference`` caches the
    reference's side between calls (--eval-every: it does not change during training)."""
    cond = heldout_conditions(task, pairs, per_prompt)
    n = len(cond)
    traj = sample_in_chunks(
        task, n, seed, cond=cond, with_kl=True, progress=progress and "fine-tuned"
    )
    ours = scored_side(task, rewards, reward_inputs(task, traj.x0), cond, features[0])
    ref = reference if reference is not None and reference.get("n") == n else None
    if ref is None:
        ref_x0 = sample_in_chunks(
            task, n, seed, cond=cond, policy=False, progress=progress and "reference"
        ).x0
        ref = {"n": n, **scored_side(task, rewards, reward_inputs(task, ref_x0), cond, features[0])}
        if reference is not None:
            reference.update(ref)
    assert traj.kl is not None
    return compare_sides(
        pairs, per_prompt, ours, ref, traj.kl.sum(dim=1), trained, features[1], distances, fid
    )


def summary_rows(metrics: Mapping[str, Any]) -> list[tuple[str, float, float]]:
    """(metric, reference, fine-tuned) of a held-out evaluation, for eval.md and the report."""
    rows = [
        (f"{name} (trained)" if r["trained"] else name, r["ref_mean"], r["mean"])
        for name, r in metrics["rewards"].items()
    ]
    rows.append(("diversity", metrics["ref_eval_diversity"], metrics["eval_diversity"]))
    rows += [
        (label, metrics[f"ref_{name}_diversity"], metrics[f"{name}_diversity"])
        for name, label in DIVERSITY_LABELS.items()
        if f"{name}_diversity" in metrics
    ]
    rows.append(("path KL", 0.0, metrics["kl_path"]))
    rows.append(("Fréchet distance to the reference", 0.0, metrics["frechet_to_reference"]))
    if "fid_inception_to_reference" in metrics:
        rows.append((FID_LABEL, 0.0, metrics["fid_inception_to_reference"]))
    return rows


def prompt_rows(metrics: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-prompt table: "reference → fine-tuned" for each reward and
    the diversity, then the path KL."""
    names = list(metrics["rewards"])
    first = metrics["per_prompt"][0] if metrics["per_prompt"] else {}
    extra = [name for name in DIVERSITY_LABELS if f"{name}_diversity" in first]
    header = ["prompt", *(f"{n} ref → ft" for n in names), "diversity ref → ft"]
    header += [f"{DIVERSITY_LABELS[name]} ref → ft" for name in extra] + ["KL"]
    rows = []
    for row in metrics["per_prompt"]:
        cells = [row["prompt"]]
        cells += [
            f"{row['rewards'][n]['reference']:.4g} → {row['rewards'][n]['fine_tuned']:.4g}"
            for n in names
        ]
        cells.append(f"{row['ref_diversity']:.4g} → {row['diversity']:.4g}")
        for name in extra:
            cells.append(f"{row[f'ref_{name}_diversity']:.4g} → {row[f'{name}_diversity']:.4g}")
        cells.append(f"{row['kl_path']:.4g}")
        rows.append(cells)
    return header, rows


def describe(metrics: Mapping[str, Any]) -> str:
    """What a held-out evaluation drew and measured, in a sentence or three."""
    text = (
        f"{metrics['num_prompts']} prompts ({metrics['prompts']}), "
        f"{metrics['images_per_prompt']} images each from seed {metrics['seed']}; weights: "
        f"{metrics['weights']}. Diversity: mean pairwise distance of "
        f"{metrics['diversity_features']} within a prompt's images."
    )
    for name, label in DIVERSITY_LABELS.items():
        if f"{name}_diversity" in metrics and name in metrics:
            text += f" {label}: mean pairwise distance, {metrics[name]}."
    if "fid_inception_to_reference" in metrics:
        text += f" {FID_LABEL}: {metrics['fid']}, {metrics['num_samples']} images each."
    return text


def describe_overrides(overrides: Mapping[str, Mapping[str, Any]]) -> str:
    """The settings an evaluation took over the run's own, as one line of flags' KEY=VALUE."""
    items = [f"{table}.{key}={value!r}" for table, values in overrides.items()
             for key, value in values.items()]  # fmt: skip
    return "measured with settings over the run's own: " + ", ".join(items)


def eval_markdown(metrics: Mapping[str, Any], title: str) -> str:
    """eval.md: the summary (reference against fine-tuned) and the per-prompt table."""
    lines = [f"# {title}", "", describe(metrics), ""]
    if metrics.get("overrides"):  # not the run as trained: the page says so before its numbers
        lines += [describe_overrides(metrics["overrides"]) + ".", ""]
    lines.append("| metric | reference | fine-tuned |")
    lines.append("|---|---:|---:|")
    lines += [f"| {name} | {ref:.4g} | {ft:.4g} |" for name, ref, ft in summary_rows(metrics)]
    header, rows = prompt_rows(metrics)
    lines += ["", "## Per prompt", "", "| " + " | ".join(header) + " |"]
    lines.append("|---" + "|---:" * (len(header) - 1) + "|")
    for cells in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
