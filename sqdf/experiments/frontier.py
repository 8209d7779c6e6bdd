"""``sqdf compare --frontier``'s output: each method's runs as reward against path KL, and on
gmm2d the exact frontier (sqdf.core.frontier) with every run's distance to it.

A run's headline number is its **frontier gap**: the most reward any distribution reaches at
the run's KL, less the reward the run reached (>= 0 up to sampling noise and the reference
sampler's own error, which add_frontier_distances removes to first order; 0 is the optimum).
The **KL excess** reads the same distance along the other axis: the run's KL less the least
KL with which its reward is reachable.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sqdf.core.frontier import (
    FrontierPoint,
    exact_frontier,
    frontier_kl_at,
    frontier_reward_at,
)
from sqdf.infra.atomic import atomic_write_text
from sqdf.infra.report import mean_std, pyplot
from sqdf.run.settings import make_config
from sqdf.sampling.sampler import sample_in_chunks
from sqdf.tasks import build_task

# second panels beside reward: how natural the samples stay, where the task measures it
SIDE_PANELS = {"digits": ("eval_agreement", "eval_frechet")}
# the reference sampler's own reward error: its draws, on a seed apart from the evaluations'
OFFSET_SAMPLES = 65_536
OFFSET_SEED = 917_455
# alphas at which frontier.md lists the exact curve
LISTED_ALPHAS = (8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125)


@dataclass(frozen=True)
class SamplerOffset:
    """The untouched reference sampler's mean reward less the exact reference's: its finite
    steps' error, measured on ``samples`` draws of its own (standard error ``se``)."""

    value: float
    se: float
    samples: int


def gmm2d_frontier(base: dict[str, Any]) -> tuple[list[FrontierPoint], SamplerOffset]:
    """The exact frontier of the base config's reference output under its reward (the
    frontier moves with the reward and the mixture, not with alpha), and the reference
    sampler's offset from its first point."""
    task = build_task(make_config({**base, "method": "sqdf"}, source="frontier"))
    curve = exact_frontier(task.reward_model, task.reference_output())
    with torch.no_grad():
        x0 = sample_in_chunks(task, OFFSET_SAMPLES, OFFSET_SEED, policy=False).x0
        r = task.reward(x0, torch.zeros(len(x0), dtype=torch.long)).double()
    se = float(r.std()) / math.sqrt(len(r))
    return curve, SamplerOffset(float(r.mean()) - curve[0].reward, se, len(r))


def add_frontier_distances(
    records: list[dict[str, Any]], curve: list[FrontierPoint], offset: float = 0.0
) -> None:
    """Each run's frontier reward at its path KL, its frontier gap and its KL excess, against
    the exact frontier shifted by ``offset`` (the reference sampler's own reward error,
    ``SamplerOffset``), so that the untouched sampler itself sits on the curve. The shift is
    first-order: the sampler's error under a tilt is taken to be its error at the reference."""
    for r in records:
        if not all(math.isfinite(r.get(k, math.nan)) for k in ("kl_path", "reward_mean")):
            continue  # diverged, or a KL no curve reaches: no distance to report
        best = frontier_reward_at(curve, r["kl_path"]) + offset
        r["frontier_offset"] = offset
        r["frontier_reward"] = best
        r["frontier_gap"] = best - r["reward_mean"]
        r["frontier_kl_excess"] = r["kl_path"] - frontier_kl_at(curve, r["reward_mean"] - offset)


def _groups(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["variant"], []).append(r)
    return groups


def _mean(rs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rs if key in r and math.isfinite(r[key])]
    return statistics.mean(values) if values else math.nan


def frontier_markdown(
    task_name: str,
    records: list[dict[str, Any]],
    curve: list[FrontierPoint] | None,
    offset: SamplerOffset | None = None,
) -> str:
    cols = ["kl_path", "reward_mean"]
    if curve is not None:
        cols += ["frontier_reward", "frontier_gap", "frontier_kl_excess"]
    cols += list(SIDE_PANELS.get(task_name, ()))
    head = ["method", "setting"] + cols
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    groups = _groups(records)
    for rs in groups.values():
        r0 = rs[0]
        setting = f"{r0['knob']}={r0['value']:g}"
        cells = [r0["method"], setting] + [mean_std([r.get(c, math.nan) for r in rs]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = len({r["seed"] for r in records})
    out = [f"# Reward against path KL: {task_name}", "", *lines, "",
           f"Mean ± std over {seeds} seed(s); a diverged run has no row values."]  # fmt: skip
    if curve is not None:
        out += ["", "## Distance to the exact frontier, by method", "",
                "| method | mean frontier_gap | least frontier_gap | at setting |",
                "| --- | --- | --- | --- |"]  # fmt: skip
        for method in dict.fromkeys(r["method"] for r in records):
            per = {name: _mean(rs, "frontier_gap") for name, rs in groups.items()
                   if rs[0]["method"] == method}  # fmt: skip
            finite = {n: g for n, g in per.items() if math.isfinite(g)}
            if not finite:
                out.append(f"| {method} | n/a | n/a | n/a |")
                continue
            best = min(finite, key=finite.get)
            out.append(f"| {method} | {statistics.mean(finite.values()):.4f} | "
                       f"{finite[best]:.4f} | {best} |")  # fmt: skip
        ref = curve[0].reward
        shift = offset or SamplerOffset(0.0, math.nan, 0)
        out += ["", "The exact frontier (the tilted reference p_ref·exp(r/α)/Z):", "",
                "| alpha | KL | reward |", "| --- | --- | --- |"]  # fmt: skip
        # the curve's own points nearest the listed alphas, each with its alpha
        out += [f"| {p.alpha:.3g} | {p.kl:.4f} | {p.reward:.4f} |"
                for p in (_point_near(curve, a) for a in LISTED_ALPHAS)]  # fmt: skip
        out += ["",
                "- frontier_gap: the frontier's reward at the run's path KL less the run's "
                "reward; frontier_kl_excess: the run's path KL less the least KL that reaches "
                "its reward. Path KL bounds the output's KL from above, so both are >= 0 up to "
                "sampling noise and the sampler's own error, and 0 is the optimum.",
                f"- The exact reference's reward is {ref:.4f}; the untouched reference sampler "
                f"(finite steps) reaches {ref + shift.value:.4f} ± {shift.se:.4f} on "
                f"{shift.samples:,} draws of its own. The distances are taken to the exact "
                f"frontier shifted by that difference ({shift.value:+.4f}, frontier_offset), "
                "so that the untouched sampler sits on it: a first-order correction, which "
                "takes the sampler's error under a tilt to be its error at the reference. A "
                "run's own evaluation noise (its reward_std / sqrt(samples)) remains in its "
                "gap.",
                "- A run whose path KL lies past the curve's last point (alpha "
                f"{curve[-1].alpha:g}, KL {curve[-1].kl:.2f}) or is not finite has no distance "
                "(n/a)."]  # fmt: skip
    if any(r["method"] == "best_of_n" for r in records):
        out.append(
            "- best_of_n: kl_path is log n - (n-1)/n, the output's KL for a continuous "
            "reward distribution (no path: no training), not a measured path KL."
        )
    return "\n".join(out) + "\n"


def _point_near(curve: list[FrontierPoint], alpha: float) -> FrontierPoint:
    return min(curve, key=lambda p: abs(math.log(p.alpha / alpha)))


KL_DECADES_LINEAR = 2  # beyond this many decades of path KL the axis is logarithmic


def kl_axis_threshold(kls: list[float]) -> float | None:
    """Where a symmetric-log KL axis turns linear (the least positive KL shown), or None for a
    linear axis: the runs' KLs span at most KL_DECADES_LINEAR decades (DRaFT's thousands of
    nats beside best-of-N's few would otherwise squeeze every other method onto 0)."""
    positive = [k for k in kls if k > 0]
    if not positive or max(positive) <= 10**KL_DECADES_LINEAR * min(positive):
        return None
    return min(positive)


def frontier_plot(
    task_name: str, records: list[dict[str, Any]], curve: list[FrontierPoint] | None, path: Path
) -> None:
    """Reward (and on gmm2d the frontier gap; on digits the side panels) against path KL:
    one line per method through its settings' means, its runs as dots; where known, the exact
    frontier (grey, dashed) and the frontier the runs are measured against (black: shifted by
    the reference sampler's offset, add_frontier_distances)."""
    ys = ["reward_mean"] + (["frontier_gap"] if curve is not None else [])
    ys += list(SIDE_PANELS.get(task_name, ()))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(ys), figsize=(5.2 * len(ys), 4.2), squeeze=False)
    groups = _groups(records)
    methods = list(dict.fromkeys(r["method"] for r in records))
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}

    def shown(r: dict[str, Any], y: str) -> bool:  # diverged or blown-up runs stay off
        kl, v = r.get("kl_path", math.nan), r.get(y, math.nan)
        in_range = curve is None or kl <= curve[-1].kl
        return math.isfinite(kl) and math.isfinite(v) and in_range

    kls = [r["kl_path"] for r in records if shown(r, "reward_mean")]
    threshold = kl_axis_threshold(kls)
    offsets = [r["frontier_offset"] for r in records if "frontier_offset" in r]
    offset = statistics.mean(offsets) if offsets else 0.0
    for ax, y in zip(axes[0], ys, strict=True):
        for m in methods:
            runs = [r for r in records if r["method"] == m and shown(r, y)]
            ax.scatter([r["kl_path"] for r in runs], [r[y] for r in runs],
                       color=colors[m], s=14, alpha=0.45)  # fmt: skip
            means = sorted(
                (_mean(ok, "kl_path"), _mean(ok, y))
                for rs in groups.values() if rs[0]["method"] == m
                for ok in [[r for r in rs if shown(r, y)]] if ok
            )  # fmt: skip
            means = [p for p in means if all(math.isfinite(v) for v in p)]
            if means:
                ax.plot(*zip(*means, strict=True), "o-", color=colors[m], label=m, ms=5)
        if curve is not None and y == "reward_mean" and kls:
            part = [p for p in curve if p.kl <= 1.15 * max(kls)]
            x = [p.kl for p in part]
            ax.plot(x, [p.reward + offset for p in part], color="black", lw=1.6,
                    label=f"exact frontier + sampler offset {offset:+.3f}")  # fmt: skip
            ax.plot(x, [p.reward for p in part], color="grey", lw=1.0, ls="--",
                    label="exact frontier")  # fmt: skip
        if y == "frontier_gap":
            ax.axhline(0.0, color="black", lw=1.0)
        ax.set(xlabel="kl_path", ylabel=y, title=f"{y} against path KL")
        if threshold is not None:
            ax.set_xscale("symlog", linthresh=threshold)
            ax.set_xlabel("kl_path (symmetric log scale)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frontier_distances(
    task_name: str, base: dict[str, Any], records: list[dict[str, Any]]
) -> tuple[list[FrontierPoint], SamplerOffset] | None:
    """On gmm2d: the exact frontier and the sampler's offset, with every record's distances
    added in place (add_frontier_distances); None on a task without an exact frontier."""
    if task_name != "gmm2d":
        return None
    curve, offset = gmm2d_frontier(base)
    add_frontier_distances(records, curve, offset.value)
    return curve, offset


def write_frontier(
    task_name: str,
    records: list[dict[str, Any]],
    exact: tuple[list[FrontierPoint], SamplerOffset] | None,
    out: Path,
) -> None:
    """frontier.json, frontier.md and frontier.png in ``out``; ``exact``: frontier_distances'
    curve and offset, where the task has them."""
    curve, offset = exact if exact is not None else (None, None)
    doc = {
        "task": task_name,
        "runs": records,
        "exact_frontier": None if curve is None else [vars(p) for p in curve],
        "sampler_offset": None if offset is None else vars(offset),
    }
    atomic_write_text(out / "frontier.json", json.dumps(doc, indent=1, default=float))
    atomic_write_text(out / "frontier.md", frontier_markdown(task_name, records, curve, offset))
    frontier_plot(task_name, records, curve, out / "frontier.png")
