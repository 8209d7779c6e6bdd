"""``sqdf compare``: every method (or every value of one setting) on the same seeds and the
same budget, with a table, a Pareto plot and training curves.

Budget: every variant makes the same number of optimizer updates on the same batch sizes;
reward evaluations and wall time differ by method and are reported beside the metrics.
``best_of_n`` is the no-training baseline: for each output, the best of N reference samples.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sqdf.config.train_config import TrainConfig
from sqdf.errors import ConfigError, DivergedError, SqdfError
from sqdf.evaluation.evaluate import EVAL_SEED, PER_PROMPT, evaluate_run, load_run, score_samples
from sqdf.evaluation.heldout import (
    compare_sides,
    heldout_conditions,
    image_features,
    reward_inputs,
    scored_side,
)
from sqdf.experiments.frontier import frontier_distances, write_frontier
from sqdf.infra.atomic import atomic_write_text, folder_writes, make_folder
from sqdf.infra.distributed import Processes
from sqdf.infra.preemption import Preempted, stop_here_if_signalled, stop_on_signals
from sqdf.infra.report import mean_std, pyplot
from sqdf.infra.trackers import check_installed, parse_log_with
from sqdf.methods import METHODS
from sqdf.run.folder import read_metrics
from sqdf.run.settings import make_config, resolve_settings
from sqdf.sampling.sampler import sample_in_chunks, sample_trajectories
from sqdf.tasks import build_task, resolved_reward_name, sample_shape
from sqdf.tasks.sd_prompts import load_prompt_pairs
from sqdf.training.start import check_method_takes_reward
from sqdf.training.trainer import train

BEST_OF_N = "best_of_n"
SPEC = "compare.json"  # the arguments, for resume_compare
PANEL_POINTS = 1024  # samples drawn in each variant's panel of samples.png
# (metric, direction) shown per task; "up" means higher is better
COLUMNS = {
    "gmm2d": [("reward_mean", "up"), ("kl_path", "down"), ("target_mode_tv", "down"),
              ("target_sliced_w2", "down")],
    "digits": [("reward_mean", "up"), ("kl_path", "down"), ("eval_agreement", "up"),
               ("eval_frechet", "down"), ("eval_diversity", "up")],
}  # fmt: skip
# (x: naturalness, y: diversity) axes of the Pareto plot against reward
PARETO = {
    "gmm2d": ("target_sliced_w2", "target_mode_tv"),
    "digits": ("eval_frechet", "eval_diversity"),
}


# --frontier: the setting through which each method trades reward for closeness to the
# reference; a method not listed has no KL term, so it trades through its number of updates
KNOBS = {"sqdf": "alpha", "draft_kl": "alpha", "grpo": "beta", BEST_OF_N: "best_of"}
UPDATES_KNOB = "steps"
# default values: alpha and updates as multiples of the base run's (updates rounded); GRPO's
# beta as weights of the exact KL per dimension, divided by the sample's dimensions D for our
# summed KL (values on the scale of Flow-GRPO's 0.01 PickScore and 0.04 GenEval, which weight
# another, per-step KL: docs/flow-grpo.md); N as they are
KNOB_FACTORS = {"alpha": (4.0, 2.0, 1.0, 0.5, 0.25), UPDATES_KNOB: (0.25, 0.5, 1.0)}
KNOB_PER_DIM = {"beta": (0.16, 0.04, 0.01, 0.0)}
KNOB_VALUES = {"best_of": (2, 4, 16, 64)}
METHOD_PARAM_KNOBS = ("beta",)  # knobs that are method_params keys, not config keys


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]  # config values over the base (best_of_n: {"best_of": N} or {})
    method: str
    # --frontier: the regularisation setting this variant moves, and its value
    knob: str | None = None
    value: Any = None


def _check_methods(methods: list[str]) -> None:
    for m in methods:
        if m != BEST_OF_N and m not in METHODS:
            raise SqdfError(
                f"unknown method {m!r}; known: {', '.join(sorted(METHODS))}, {BEST_OF_N}"
            )
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise SqdfError(f"method {repeated[0]!r} is listed twice in --methods")


def plan_variants(methods: list[str], sweep: tuple[str, list[Any]] | None) -> list[Variant]:
    """One variant per method, or per swept value of one config key (first method)."""
    _check_methods(methods)
    if sweep is None:
        return [Variant(m, {"method": m} if m != BEST_OF_N else {}, m) for m in methods]
    key, values = sweep
    if methods and methods[0] == BEST_OF_N:
        raise SqdfError("--sweep needs a trained method first in --methods")
    return [Variant(f"{key}={v}", {"method": methods[0], key: v}, methods[0]) for v in values]


def knob_of(method: str) -> str:
    return KNOBS.get(method, UPDATES_KNOB)


def plan_frontier(
    methods: list[str], base: dict[str, Any], given: dict[str, list[Any]] | None = None
) -> list[Variant]:
    """Each method over its regularisation (``knob_of``): the values in ``given`` for that
    method, else the defaults (KNOB_FACTORS of ``base``'s value, KNOB_PER_DIM over
    ``base["dims"]``, or KNOB_VALUES)."""
    _check_methods(methods)
    given = given or {}
    stray = sorted(set(given) - set(methods))
    if stray:
        raise SqdfError(f"--frontier-values names {stray[0]!r}, which is not in --methods")
    variants = []
    for m in methods:
        knob = knob_of(m)
        if m in given:
            values = list(given[m])
        elif knob == UPDATES_KNOB:  # whole updates, each value once
            values = list(dict.fromkeys(max(1, round(base[knob] * f)) for f in KNOB_FACTORS[knob]))
        elif knob in KNOB_FACTORS:
            values = [base[knob] * f for f in KNOB_FACTORS[knob]]
        elif knob in KNOB_PER_DIM:
            values = [v / base["dims"] for v in KNOB_PER_DIM[knob]]
        else:
            values = list(KNOB_VALUES[knob])
        odd = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))
               or not math.isfinite(v)]  # fmt: skip
        if odd:
            raise SqdfError(f"{m}: {knob} values must be numbers, got {odd[0]!r}")
        if knob in (UPDATES_KNOB, "best_of"):
            bad = [v for v in values if v < 1 or v != int(v)]
            if bad:
                raise SqdfError(f"{m}: {knob} values must be whole numbers >= 1, got {bad[0]!r}")
            values = [int(v) for v in values]
        if len(set(values)) != len(values):
            raise SqdfError(f"{m}: the {knob} values {values} repeat one")
        for v in values:
            if m == BEST_OF_N:
                overrides: dict[str, Any] = {"best_of": v}
            elif knob in METHOD_PARAM_KNOBS:
                params = {**base.get("method_params", {}), knob: v}
                overrides = {"method": m, "method_params": params}
            else:
                overrides = {"method": m, knob: v}
            variants.append(Variant(f"{m}-{knob}={v:g}", overrides, m, knob, v))
    return variants


def _config(base: dict[str, Any], variant: Variant, seed: int) -> TrainConfig:
    values = {**base, **variant.overrides, "seed": seed}
    required = METHODS[values["method"]].buffer
    if required is not None:
        values["buffer"] = required  # e.g. DDPO learns on-policy only
    return make_config(values, source=f"compare variant {variant.name}")


def best_of_n(base: dict[str, Any], n: int, num_samples: int | None, seed: int) -> dict[str, Any]:
    """Metrics of best-of-n sampling from the reference: no training at all. Scored as every
    trained run is (``evaluate_run``): the task's number of samples (sd: its held-out prompts,
    PER_PROMPT images each), against the same reference draws (EVAL_SEED), in the task's
    chunks; ``seed`` draws the candidates."""
    cfg = make_config({**base, "seed": seed}, source="best_of_n")
    torch.manual_seed(seed)
    task = build_task(cfg)
    pairs, cond = None, None
    if hasattr(task, "add_prompts"):  # sd: the held-out prompts, as evaluate_run scores them
        pairs = load_prompt_pairs(task.options.eval_prompts)
        cond = heldout_conditions(task, pairs, PER_PROMPT)
        num_samples = len(cond)
    num_samples = task.eval_samples if num_samples is None else num_samples
    ref = sample_in_chunks(task, num_samples, EVAL_SEED, policy=False, cond=cond)
    cond = ref.cond.repeat_interleave(n)  # n candidates for each reference draw's condition
    g = torch.Generator().manual_seed(seed)
    chunk = task.eval_batch or num_samples  # never n * num_samples trajectories at once
    cands = torch.cat([
        # clone: x0 is a view that would keep its chunk's whole trajectories alive
        sample_trajectories(task, len(c), g, policy=False, cond=c).x0.clone()
        for c in cond.split(chunk)
    ])  # fmt: skip
    r = score_samples(task, cands, cond)
    best = r.view(num_samples, n).argmax(dim=1) + torch.arange(num_samples) * n
    samples, rb = cands[best], r[best]
    # KL(best-of-n || ref) <= log n - (n-1)/n (Beirami et al., 2024), with equality for a
    # reward without atoms (the gmm2d rewards): not measured
    kl_bound = math.log(n) - (n - 1) / n
    if pairs is not None:
        out = _held_out_metrics(task, cfg, pairs, samples, ref.x0, ref.cond, kl_bound)
    else:
        r_ref = score_samples(task, ref.x0, ref.cond)
        out = {
            "reward_mean": float(rb.mean()), "reward_std": float(rb.std()),
            "kl_path": kl_bound, "ref_reward_mean": float(r_ref.mean()),
        }  # fmt: skip
        gen = torch.Generator().manual_seed(EVAL_SEED + 1)  # as evaluate_run's
        out.update(task.evaluate(samples, ref.x0, ref.cond, gen))
    out["reward_evals"] = num_samples * n
    out["updates"] = 0
    out["samples"] = samples
    return out


def _held_out_metrics(
    task: Any,
    cfg: TrainConfig,
    pairs: list,
    samples: torch.Tensor,
    ref_x0: torch.Tensor,
    cond: torch.Tensor,
    kl: float,
) -> dict[str, Any]:
    """evaluate_run's held-out sd summary of best-of-n's picks against the reference."""
    trained = resolved_reward_name(cfg)
    rewards = {trained: task.reward_model}
    features = image_features(rewards, None, task.device)
    ours = scored_side(task, rewards, reward_inputs(task, samples), cond, features[0])
    theirs = scored_side(task, rewards, reward_inputs(task, ref_x0), cond, features[0])
    kls = torch.full((len(cond),), kl)
    out = compare_sides(pairs, PER_PROMPT, ours, theirs, kls, trained, features[1])
    out.pop("per_prompt")
    return out


def compare(
    base: dict[str, Any],
    methods: list[str],
    seeds: int,
    out: str | Path,
    *,
    sweep: tuple[str, list[Any]] | None = None,
    num_samples: int | None = None,
    best_of: int = 16,
    frontier: bool = False,
    frontier_values: dict[str, list[Any]] | None = None,
    progress: bool = True,
    resume: bool = False,
) -> Path:
    """Train and evaluate every variant on seeds 0..seeds-1; write results and plots to ``out``.
    ``frontier``: every method over its regularisation (``plan_frontier``), with the
    reward–KL frontier written beside the results (sqdf.experiments.frontier). SIGTERM, SIGINT or
    SIGUSR1 stop it after the training update in flight, with a checkpoint (``Preempted``);
    ``resume_compare`` goes on from there. ``resume``: keep the variants ``out`` has finished."""
    out = Path(out)
    args = {"base": base, "methods": methods, "seeds": seeds, "sweep": sweep,
            "num_samples": num_samples, "best_of": best_of, "frontier": frontier,
            "frontier_values": frontier_values}  # fmt: skip
    with stop_on_signals(), folder_writes(out, lambda: f"; continue with: {_again(out)}"):
        return _compare(out, args, progress=progress, resume=resume)


def resume_compare(out: str | Path, *, progress: bool = True) -> Path:
    """Continue a ``compare`` that stopped: the variants it finished are kept (and scored
    again), one stopped part way continues from its checkpoint, the rest run."""
    out = Path(out)
    try:
        args = json.loads((out / SPEC).read_text())
        sweep = args["sweep"]
        args["sweep"] = (sweep[0], sweep[1]) if sweep else None
    except (OSError, ValueError, KeyError, TypeError):
        raise SqdfError(f"not an sqdf compare folder (no valid {SPEC}): {out}") from None
    return compare(**args, out=out, progress=progress, resume=True)


def _again(out: Path) -> str:
    return f"sqdf compare --resume {out}"


def _compare(out: Path, args: dict[str, Any], *, progress: bool, resume: bool) -> Path:
    base, methods, seeds, sweep = args["base"], args["methods"], args["seeds"], args["sweep"]
    num_samples, best_of, frontier = args["num_samples"], args["best_of"], args["frontier"]
    frontier_values = args["frontier_values"]
    if not resume and out.is_dir() and any(out.iterdir()):
        raise SqdfError(f"output folder {out} already exists and is not empty; pick another")
    if seeds < 1:
        raise SqdfError(f"seeds must be >= 1, got {seeds}")
    if frontier and sweep is not None:
        raise SqdfError("--frontier sweeps each method's own regularisation; drop --sweep")
    if frontier_values and not frontier:
        raise SqdfError("--frontier-values needs --frontier")
    base = resolve_settings(flags=base).values  # the task's defaults under the given values
    checked = make_config({**base, "method": "sqdf"}, source="compare base")  # bad keys: now
    base.setdefault("task", checked.task)  # the built-in default task, where none was given
    if frontier:  # the knobs' defaults scale the base's values, built-in defaults included
        scaled = {k: getattr(checked, k) for k in ("alpha", UPDATES_KNOB, "method_params")}
        scaled["dims"] = math.prod(sample_shape(checked))
        variants = plan_frontier(methods, scaled, frontier_values)
    else:
        variants = plan_variants(methods, sweep)
    check_installed(parse_log_with(checked.log_with))  # before any variant runs
    if best_of < 1:
        raise SqdfError(f"--best-of must be >= 1, got {best_of}")
    if num_samples is not None and num_samples < 2:
        raise SqdfError(f"--num-samples must be >= 2 (metrics need a spread), got {num_samples}")
    if num_samples is not None and base.get("task") == "sd":
        raise ConfigError(
            f"--num-samples is for gmm2d and digits: sd variants are scored on the held-out "
            f"eval_prompts, {PER_PROMPT} images each"
        )
    for variant in variants:  # every variant's settings, before any of them trains
        if variant.method != BEST_OF_N:
            check_method_takes_reward(_config(base, variant, 0))
    # launched on several processes, every one trains; the main one evaluates and writes
    procs = Processes(str(base.get("device", "auto")))
    procs.barrier()  # every process has checked the folder before the main one fills it
    if procs.is_main:
        make_folder(out, "output folder")
        atomic_write_text(out / SPEC, json.dumps(args, indent=1))  # what resume_compare reruns
    records: list[dict[str, Any]] = []
    samples: dict[str, torch.Tensor] = {}
    curves: dict[str, list[list[dict]]] = {}
    for variant in variants:
        for seed in range(seeds):
            where = f"before {variant.name} seed {seed}; continue with: {_again(out)}"
            stop_here_if_signalled(procs, where)
            t0 = time.perf_counter()
            if variant.method == BEST_OF_N:
                if not procs.is_main:
                    continue
                n = variant.overrides.get("best_of", best_of)
                metrics = best_of_n(base, n, num_samples, seed)
                sample = metrics.pop("samples")
            else:
                cfg = _config(base, variant, seed)
                run = out / "runs" / f"{variant.name}-seed{seed}"
                sample = None
                metrics = train_variant(cfg, run, procs, resume=resume, progress=progress)
                if not procs.is_main:
                    continue
                if "diverged" not in metrics:
                    metrics = evaluate_run(run, num_samples=num_samples, progress=False)
                    if seed == 0 and base["task"] == "gmm2d":  # the panel only gmm2d draws
                        task = load_run(run)
                        gen = torch.Generator().manual_seed(0)
                        sample = sample_trajectories(task, PANEL_POINTS, gen).x0
                rows = read_metrics(run)
                metrics["reward_evals"] = rows[-1]["reward_evals"] if rows else 0
                metrics["updates"] = rows[-1]["step"] if rows else 0
                curves.setdefault(variant.name, []).append(rows)
            if sample is not None and seed == 0:
                samples[variant.name] = sample[:PANEL_POINTS]  # as many dots in each panel
            metrics["wall_s"] = round(time.perf_counter() - t0, 1)
            metrics["eval_seed"] = metrics.pop("seed", None)
            if variant.knob is not None:
                metrics.update(method=variant.method, knob=variant.knob, value=variant.value)
            records.append({"variant": variant.name, **metrics, "seed": seed})
    if not procs.is_main:
        procs.barrier()
        return out
    task_name = base["task"]
    doc = {"task": task_name, "base": base, "seeds": seeds, "sweep": sweep and list(sweep),
           "frontier": frontier, "variants": [v.name for v in variants],
           "runs": records}  # fmt: skip
    # each run's distance to the exact frontier goes into results.json too
    exact = frontier_distances(task_name, base, records) if frontier else None
    atomic_write_text(out / "results.json", json.dumps(doc, indent=1, default=float))
    atomic_write_text(
        out / "results.md", results_markdown(task_name, records, [v.name for v in variants])
    )
    if frontier:
        write_frontier(task_name, records, exact, out)
    pareto_plot(task_name, records, out / "pareto.png")
    _curves(curves, out / "curves.png")
    if task_name == "gmm2d" and samples:
        _gmm_samples(base, variants, samples, out / "samples.png")
    procs.barrier()
    return out


def train_variant(
    cfg: TrainConfig, run: Path, procs: Processes, *, resume: bool, progress: bool
) -> dict[str, Any]:
    """Train one variant's run: {} when it trained, {"diverged": why} when the method blew up
    (a result, not an error). ``resume``: a finished run is kept, one with a checkpoint
    continues from it, a run that never got a checkpoint starts again."""
    if resume and (run / "final" / "policy.safetensors").is_file():
        return {}
    again = resume and (run / "config.json").is_file()
    if resume and not again and procs.is_main:
        shutil.rmtree(run, ignore_errors=True)
    try:
        train(cfg, run, resume=again, progress=progress)
    except DivergedError as err:  # a method that blows up is a result
        return {"diverged": str(err)}
    except Preempted as stop:
        where = str(stop).split(";")[0]  # "stopped by SIGTERM at update N"
        raise Preempted(
            stop.signum,
            f"{where} of {run.name}; checkpoint written; continue with: "
            f"{_again(run.parent.parent)}",
        ) from None
    return {}


def _shared_note(records: list[dict[str, Any]], variants: list[str], key: str) -> str:
    """``key`` over the runs, once where every variant has the same (the same reference and
    target), else per variant (a sweep that moves them, e.g. alpha moves the target)."""
    by_variant = {v: [r[key] for r in records if r["variant"] == v and key in r] for v in variants}
    by_variant = {v: vals for v, vals in by_variant.items() if vals}
    means = [statistics.mean(vals) for vals in by_variant.values()]
    if max(means) - min(means) <= 1e-9 * max(1.0, *(abs(m) for m in means)):
        return f"{key} {mean_std([x for vals in by_variant.values() for x in vals])}"
    return f"{key}: " + ", ".join(f"{v} {mean_std(vals)}" for v, vals in by_variant.items())


def results_markdown(task: str, records: list[dict[str, Any]], variants: list[str]) -> str:
    cols = COLUMNS.get(task, [("reward_mean", "up"), ("kl_path", "down")])
    head = ["variant"] + [f"{c} {'↑' if d == 'up' else '↓'}" for c, d in cols]
    head += ["reward evals", "updates", "wall s", "diverged"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for v in variants:
        rs = [r for r in records if r["variant"] == v]
        cells = [v] + [mean_std([r.get(c, math.nan) for r in rs]) for c, _ in cols]
        cells += [
            f"{statistics.mean(r['reward_evals'] for r in rs):.0f}",
            f"{max(r['updates'] for r in rs)}",
            f"{statistics.mean(r['wall_s'] for r in rs):.1f}",
            f"{sum('diverged' in r for r in rs)}/{len(rs)}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"\nMean ± std over {len({r['seed'] for r in records})} seed(s)."]
    if any("ref_reward_mean" in r for r in records):
        shared = _shared_note(records, variants, "ref_reward_mean").removeprefix("ref_")
        notes.append(f"Reference (no fine-tuning): {shared}")
        for key in ("ref_target_mode_tv", "ref_target_sliced_w2", "ref_sampler_sliced_w2",
                    "ref_eval_agreement", "ref_eval_frechet", "ref_eval_diversity",
                    "target_reward_mean", "target_kl"):  # fmt: skip
            if any(key in r for r in records):
                notes.append(_shared_note(records, variants, key))
    for r in records:
        if "diverged" in r:
            notes.append(f"{r['variant']} seed {r['seed']} diverged: {r['diverged']}")
    if any(r.get("method", r["variant"]) == BEST_OF_N for r in records):
        notes.append(
            "best_of_n: kl_path is log n - (n-1)/n (exact for a reward without atoms, else an "
            "upper bound), not a measured path KL."
        )
    return (
        "\n".join(lines)
        + "\n"
        + "; ".join(notes[:1])
        + "\n\n"
        + "\n".join(f"- {n}" for n in notes[1:])
        + "\n"
    )


def pareto_plot(task: str, records: list[dict[str, Any]], path: Path) -> None:
    """Reward against the task's naturalness and diversity measures, one dot per run."""
    x_nat, y_div = PARETO.get(task, ("kl_path", "kl_path"))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    variants = list(dict.fromkeys(r["variant"] for r in records))
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    for ax, key in zip(axes, (x_nat, y_div), strict=True):
        for r in records:
            if key in r:
                ax.scatter(
                    r[key],
                    r["reward_mean"],
                    color=colors[r["variant"]],
                    s=36,
                    label=r["variant"] if r["seed"] == 0 else None,
                )
        ax.set(xlabel=key, ylabel="reward_mean", title=f"reward against {key}")
    if any(x_nat in r for r in records):  # all diverged: nothing to label
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curves(curves: dict[str, list[list[dict]]], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (name, runs) in enumerate(curves.items()):
        color = plt.cm.tab10(i % 10)
        for j, rows in enumerate(runs):
            steps = [r["step"] for r in rows]
            axes[0].plot(
                steps,
                [r["reward_mean"] for r in rows],
                color=color,
                alpha=0.8,
                label=name if j == 0 else None,
            )
            axes[1].plot(steps, [r["kl_mean"] for r in rows], color=color, alpha=0.8)
    axes[0].set(xlabel="update", ylabel="reward of fresh samples", title="reward")
    axes[1].set(
        xlabel="update",
        ylabel="kl_mean logged by the method's loss",
        title="KL",
    )
    positive = [r["kl_mean"] for runs in curves.values() for rows in runs for r in rows]
    if any(v > 0 for v in positive):  # a log axis needs something above 0 to show
        axes[1].set_yscale("log")
    if curves:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _gmm_samples(
    base: dict[str, Any], variants: list[Variant], samples: dict[str, torch.Tensor], path: Path
) -> None:
    """Each variant's samples over its own exact target (a sweep of alpha moves it)."""
    by_name = {v.name: v for v in variants}
    targets = []
    for name in samples:
        if by_name[name].method == BEST_OF_N:  # sampled from the base config's reference
            cfg = make_config({**base, "method": "sqdf"}, source="plot")
        else:
            cfg = _config(base, by_name[name], 0)
        task = build_task(cfg)
        targets.append(task.target())
    task.plot_panels(
        list(samples.items()), path, "samples (red) over the exact target (grey)", targets
    )
