"""``sqdf bbo``: several methods on seeds 0..N-1 at the same query budget; the query data,
per-round metrics, ``results.json``, ``results.md`` and ``bbo_curve.png`` (oracle reward
against oracle queries, mean ± std over seeds, one line per method)."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from sqdf.bbo.config import BboConfig
from sqdf.bbo.loop import (
    BBO_METHODS,
    check_constant_lr,
    check_round_config,
    round_config,
    run_method,
)
from sqdf.bbo.oracle import user_oracle
from sqdf.config.params import suggest
from sqdf.config.train_config import TrainConfig
from sqdf.errors import SqdfError
from sqdf.infra.atomic import atomic_write_text, make_folder
from sqdf.infra.distributed import Processes
from sqdf.infra.report import format_mean_std, pyplot
from sqdf.methods import METHODS
from sqdf.run.settings import make_config

FORMAT = "sqdf-bbo"
SPEC = "bbo.json"


def check_methods(methods: list[str]) -> None:
    if not methods:
        raise SqdfError("give at least one method")
    for m in methods:
        if m not in BBO_METHODS:
            raise SqdfError(
                f"unknown bbo method {m!r}; known: {', '.join(BBO_METHODS)}"
                + suggest(m, BBO_METHODS)
            )


def check_method_params(base: TrainConfig, methods: list[str]) -> None:
    """Every shared method parameter belongs to one of ``methods`` (each round passes a
    method those it knows, so a misspelt one would be dropped without a word)."""
    known: set[str] = set()
    for m in methods:
        train_method = BBO_METHODS[m].train_method
        if train_method is not None:
            known |= {f.name for f in dataclasses.fields(METHODS[train_method].params)}
    for key in base.method_params:
        if key not in known:
            raise SqdfError(
                f"unknown method parameter {key!r} for {', '.join(methods)}; known: "
                f"{', '.join(sorted(known)) or 'none'}{suggest(key, known)}"
            )


def check_experiment(bbo: BboConfig, base: TrainConfig, methods: list[str], seeds: int) -> None:
    """What a new experiment checks before it makes its folder (its dry run too): the methods,
    their parameters, a schedule best_of_n can follow, the seeds, and each method's round
    config."""
    check_methods(methods)
    check_method_params(base, methods)
    if "best_of_n" in methods and len(set(bbo.query_schedule)) > 1:
        others = ",".join(m for m in methods if m != "best_of_n") or "sqdf"
        raise SqdfError(
            "best_of_n keeps the best sample of each query slot across rounds, so it needs the "
            f"same number of queries every round; query_schedule is {bbo.query_schedule}: "
            f"leave it out of --methods (e.g. --methods {others})"
        )
    if seeds < 1:
        raise SqdfError(f"seeds must be >= 1, got {seeds}")
    check_constant_lr(base)
    for m in methods:
        check_round_config(round_config(base, m, bbo, 0))


def run_bbo(
    bbo: BboConfig,
    base: TrainConfig,
    methods: list[str],
    seeds: int,
    out: str | Path,
    *,
    progress: bool = True,
) -> Path:
    """Run every method on seeds 0..seeds-1 into a new folder ``out``."""
    out = Path(out)
    check_experiment(bbo, base, methods, seeds)  # before the folder is made
    if bbo.oracle != "task":
        user_oracle(bbo.oracle, bbo.oracle_params)  # a bad name fails before a folder exists
    procs = Processes(base.device)
    if procs.is_main:  # another process's error ends the launch (the launcher stops them all)
        if out.is_dir() and any(out.iterdir()):
            raise SqdfError(
                f"output folder {out} already exists and is not empty; resume it or pick another"
            )
        make_folder(out, "output folder")
        doc = {"format": FORMAT, "bbo": bbo.to_dict(), "train": base.to_dict(),
               "methods": methods, "seeds": seeds}  # fmt: skip
        atomic_write_text(out / SPEC, json.dumps(doc, indent=1))
    procs.barrier()
    return _run_all(bbo, base, methods, seeds, out, resume=False, progress=progress)


def resume_bbo(out: str | Path, *, progress: bool = True) -> Path:
    """Continue an interrupted ``run_bbo`` from each run's last completed round; queries
    already answered are not sent again."""
    out = Path(out)
    try:
        doc = json.loads((out / SPEC).read_text())
        if doc.get("format") != FORMAT:
            raise ValueError
    except (OSError, ValueError, AttributeError):
        raise SqdfError(f"not an sqdf bbo folder (no valid {SPEC}): {out}") from None
    bbo = BboConfig(**doc["bbo"])
    base = make_config(doc["train"], source=str(out / SPEC))
    return _run_all(bbo, base, doc["methods"], doc["seeds"], out, resume=True, progress=progress)


def _run_all(
    bbo: BboConfig,
    base: TrainConfig,
    methods: list[str],
    seeds: int,
    out: Path,
    *,
    resume: bool,
    progress: bool,
) -> Path:
    procs = Processes(base.device)
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for method in methods:
        for seed in range(seeds):
            t0 = time.perf_counter()
            rows = run_method(
                bbo, base, method, seed, out / "runs" / f"{method}-seed{seed}",
                resume=resume, progress=progress,
            )  # fmt: skip
            runs.setdefault(method, []).append(rows)
            if progress and procs.is_main:
                print(f"sqdf bbo: {method} seed {seed} done in {time.perf_counter() - t0:.0f} s")
    if procs.is_main:  # the others hold no metrics: the main process measured every round
        summary = summarise(runs)
        doc = {"task": base.task, "budget": bbo.budget, "bbo": bbo.to_dict(),
               "methods": summary, "runs": runs}  # fmt: skip
        atomic_write_text(out / "results.json", json.dumps(doc, indent=1, default=float))
        atomic_write_text(out / "results.md", results_markdown(base.task, bbo, summary))
        plot_curve(summary, out / "bbo_curve.png", bbo)
    procs.barrier()
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: dict[str, list[list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """Per method, per round: queries and the mean and std over seeds of every metric."""
    summary = {}
    for method, seeds in runs.items():
        # a seed that diverged stops early; later rounds average the seeds that reached them
        n = max(len(rows) for rows in seeds)
        # every numeric metric any round has (round 0 has no proxy error yet)
        keys = list(dict.fromkeys(
            key for rows in seeds for row in rows[:n] for key, v in row.items()
            if isinstance(v, (int, float))
        ))  # fmt: skip
        per_round = []
        for k in range(n):
            present = [rows[k] for rows in seeds if len(rows) > k]
            entry = {"round": k, "queries": present[0]["queries"], "seeds_in_round": len(present)}
            for key in keys:
                if key not in ("round", "queries"):
                    mean, std = _mean_std([row.get(key, math.nan) for row in present])
                    entry[key] = mean
                    entry[f"{key}_sd"] = std
            per_round.append(entry)
        diverged = [rows[-1]["diverged"] for rows in seeds if rows and "diverged" in rows[-1]]
        summary[method] = {"seeds": len(seeds), "rounds": per_round, "diverged": diverged}
    return summary


COLUMNS = {
    "gmm2d": ["oracle_mean", "kl_path", "proxy_rmse", "proxy_bias", "target_sliced_w2"],
    "digits": ["oracle_mean", "kl_path", "proxy_rmse", "proxy_bias", "eval_agreement",
               "eval_frechet", "eval_diversity"],
    "sd": ["oracle_mean", "kl_path", "proxy_rmse", "proxy_bias", "eval_diversity"],
}  # fmt: skip


def results_markdown(task: str, bbo: BboConfig, summary: dict[str, dict[str, Any]]) -> str:
    """The last round of every method: mean ± std over seeds."""
    cols = COLUMNS.get(task, ["oracle_mean", "kl_path", "proxy_rmse"])
    lines = [
        "| method | queries | " + " | ".join(cols) + " | excluded | diverged |",
        "|" + " --- |" * (len(cols) + 4),
    ]
    for method, s in summary.items():
        if not s["rounds"]:
            continue
        last = s["rounds"][-1]
        cells = [method, str(last["queries"])]
        for c in cols:
            m, sd = last.get(c, math.nan), last.get(f"{c}_sd", math.nan)
            cells.append("n/a" if not math.isfinite(m) else format_mean_std(m, sd))
        cells.append(f"{last.get('excluded_total', 0):.0f}")
        cells.append(f"{len(s['diverged'])}/{s['seeds']}")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = max((s["seeds"] for s in summary.values()), default=0)
    return (
        "\n".join(lines)
        + f"\n\nLast round; mean ± std over {seeds} seed(s); budget {bbo.budget} queries "
        f"({bbo.schedule_text()}). oracle_mean: oracle reward of "
        "the round's fresh samples (best_of_n: of each slot's best so far); proxy_rmse, "
        "proxy_bias: the previous round's proxy on those samples; best_of_n's kl_path is the "
        "bound log n - (n-1)/n. A diverged seed (fine-tuning stopped on non-finite values) "
        "ends its curve at its last measured round; later rounds average the other seeds.\n"
    )


def plot_curve(summary: dict[str, dict[str, Any]], path: Path, bbo: BboConfig) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    curves = {}
    for method, s in summary.items():
        pts = [r for r in s["rounds"] if math.isfinite(r.get("oracle_mean", math.nan))]
        if pts:
            curves[method] = pts
    # The scale follows the methods that stay sane: from a little below where every method
    # starts (round 0, the reference) to the best mean reached. A method that blows up far
    # below would otherwise flatten every other curve; it is drawn clipped and labelled.
    start = [pts[0]["oracle_mean"] for pts in curves.values()]
    best = [r["oracle_mean"] for pts in curves.values() for r in pts]
    low = high = None
    if start and best:
        ref, top = min(start), max(max(best), max(start))
        span = max(top - ref, 1e-12)
        low, high = ref - 0.5 * span, top + 0.1 * span
    for i, (method, pts) in enumerate(curves.items()):
        x = [r["queries"] for r in pts]
        y = [r["oracle_mean"] for r in pts]
        sd = [r["oracle_mean_sd"] for r in pts]
        label = f"{method} ({summary[method]['seeds']} seed(s))"
        off = low is not None and min(y) < low
        if off:
            label += f", off the scale (down to {min(y):.3g})"
            y = [max(v, low) for v in y]
        color = plt.cm.tab10(i % 10)
        ax.plot(x, y, marker="o", color=color, label=label)
        lo = [a - b for a, b in zip(y, sd, strict=True)]
        hi = [a + b for a, b in zip(y, sd, strict=True)]
        if low is not None:  # a band as wide as a blow-up would hide the rest
            lo = [min(max(v, low), high) for v in lo]
            hi = [min(max(v, low), high) for v in hi]
        if not off:  # the spread of a curve that left the scale says nothing here
            ax.fill_between(x, lo, hi, color=color, alpha=0.2)
    if low is not None:
        ax.set_ylim(low, high)
    ax.set(
        xlabel="oracle queries",
        ylabel="oracle reward of fresh samples",
        title=f"online BBO: {bbo.schedule_text()} queries (mean ± std)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
