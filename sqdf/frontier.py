"""``sqdf compare --frontier``'s output: each method's runs as reward against path KL, and on
gmm2d the exact frontier (sqdf.core.frontier) with every run's distance to it.

A run's headline number is its **frontier gap**: the most reward any distribution reaches at
the run's KL, less the reward the run reached (>= 0 up to sampling noise; 0 is the optimum).
The **KL excess** reads the same distance along the other axis: the run's KL less the least
KL with which its reward is reachable.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from sqdf.atomic import atomic_write_text
from sqdf.core.frontier import (
    FrontierPoint,
    exact_frontier,
    frontier_kl_at,
    frontier_reward_at,
)
from sqdf.report import mean_std, pyplot
from sqdf.settings import make_config
from sqdf.tasks import build_task

# second panels beside reward: how natural the samples stay, where the task measures it
SIDE_PANELS = {"digits": ("eval_agreement", "eval_frechet")}
# alphas at which frontier.md lists the exact curve
LISTED_ALPHAS = (8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125)


def gmm2d_frontier(base: dict[str, Any]) -> list[FrontierPoint]:
    """The exact frontier of the base config's reference output under its reward (the
    frontier moves with the reward and the mixture, not with alpha)."""
    task = build_task(make_config({**base, "method": "sqdf"}, source="frontier"))
    return exact_frontier(task.reward_model, task.reference_output())


def add_frontier_distances(records: list[dict[str, Any]], curve: list[FrontierPoint]) -> None:
    """Each run's frontier reward at its path KL, its frontier gap and its KL excess."""
    for r in records:
        if "kl_path" not in r or "reward_mean" not in r:  # diverged
            continue
        best = frontier_reward_at(curve, r["kl_path"])
        r["frontier_reward"] = best
        r["frontier_gap"] = best - r["reward_mean"]
        r["frontier_kl_excess"] = r["kl_path"] - frontier_kl_at(curve, r["reward_mean"])


def _groups(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["variant"], []).append(r)
    return groups


def _mean(rs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rs if key in r and math.isfinite(r[key])]
    return statistics.mean(values) if values else math.nan


def frontier_markdown(
    task_name: str, records: list[dict[str, Any]], curve: list[FrontierPoint] | None
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
        # one reference sampler, scored once per seed's evaluation draws: its distinct values
        sampler = sorted({r["ref_reward_mean"] for r in records if "ref_reward_mean" in r})
        out += ["", "The exact frontier (the tilted reference p_ref·exp(r/α)/Z):", "",
                "| alpha | KL | reward |", "| --- | --- | --- |"]  # fmt: skip
        out += [f"| {a:g} | {p.kl:.4f} | {p.reward:.4f} |"
                for a, p in ((a, _point_near(curve, a)) for a in LISTED_ALPHAS)]  # fmt: skip
        out += ["",
                "- frontier_gap: the frontier's reward at the run's path KL less the run's "
                "reward; frontier_kl_excess: the run's path KL less the least KL that reaches "
                "its reward. Path KL bounds the output's KL from above, so both are >= 0 up to "
                "sampling noise, and 0 is the optimum.",
                f"- The exact reference's reward is {ref:.4f}; the untouched reference sampler "
                f"(finite steps) reaches {mean_std(sampler)}: the part of any gap that is the "
                "sampler's discretisation, not the fine-tuning."]  # fmt: skip
    if any(r["method"] == "best_of_n" for r in records):
        out.append(
            "- best_of_n: kl_path is log n - (n-1)/n, the output's KL for a continuous "
            "reward distribution (no path: no training), not a measured path KL."
        )
    return "\n".join(out) + "\n"


def _point_near(curve: list[FrontierPoint], alpha: float) -> FrontierPoint:
    return min(curve, key=lambda p: abs(math.log(p.alpha / alpha)))


def frontier_plot(
    task_name: str, records: list[dict[str, Any]], curve: list[FrontierPoint] | None, path: Path
) -> None:
    """Reward (and on gmm2d the frontier gap; on digits the side panels) against path KL:
    one line per method through its settings' means, its runs as dots; the exact frontier in
    black where known."""
    ys = ["reward_mean"] + (["frontier_gap"] if curve is not None else [])
    ys += list(SIDE_PANELS.get(task_name, ()))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(ys), figsize=(5.2 * len(ys), 4.2), squeeze=False)
    groups = _groups(records)
    methods = list(dict.fromkeys(r["method"] for r in records))
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    kls = [r["kl_path"] for r in records if math.isfinite(r.get("kl_path", math.nan))]
    for ax, y in zip(axes[0], ys, strict=True):
        for m in methods:
            runs = [r for r in records if r["method"] == m and y in r and "kl_path" in r]
            ax.scatter([r["kl_path"] for r in runs], [r[y] for r in runs],
                       color=colors[m], s=14, alpha=0.45)  # fmt: skip
            means = sorted(
                (_mean(rs, "kl_path"), _mean(rs, y))
                for rs in groups.values() if rs[0]["method"] == m
            )  # fmt: skip
            means = [p for p in means if all(math.isfinite(v) for v in p)]
            if means:
                ax.plot(*zip(*means, strict=True), "o-", color=colors[m], label=m, ms=5)
        if curve is not None and y == "reward_mean" and kls:
            shown = [p for p in curve if p.kl <= 1.15 * max(kls)]
            ax.plot([p.kl for p in shown], [p.reward for p in shown], color="black", lw=1.6,
                    label="exact frontier")  # fmt: skip
        if y == "frontier_gap":
            ax.axhline(0.0, color="black", lw=1.0)
        ax.set(xlabel="kl_path", ylabel=y, title=f"{y} against path KL")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_frontier(
    task_name: str, base: dict[str, Any], records: list[dict[str, Any]], out: Path
) -> None:
    """frontier.json, frontier.md and frontier.png in ``out``. On gmm2d every record gains
    its frontier_reward, frontier_gap and frontier_kl_excess (in place, so that the
    caller's results.json holds them too)."""
    curve = None
    if task_name == "gmm2d":
        curve = gmm2d_frontier(base)
        add_frontier_distances(records, curve)
    doc = {
        "task": task_name,
        "runs": records,
        "exact_frontier": None if curve is None else [vars(p) for p in curve],
    }
    atomic_write_text(out / "frontier.json", json.dumps(doc, indent=1, default=float))
    atomic_write_text(out / "frontier.md", frontier_markdown(task_name, records, curve))
    frontier_plot(task_name, records, curve, out / "frontier.png")
