"""``sqdf bbo --dry-run``: what an experiment would do, without sampling, querying or training.
The BBO settings with their sources, then one fine-tuning round's settings, cost and fit as
``sqdf train --dry-run`` reports them (its own report, reused), the update scored by the
proxy."""

from __future__ import annotations

from typing import Any

from sqdf.bbo.config import BboConfig, bbo_fields
from sqdf.bbo.experiment import check_experiment
from sqdf.bbo.loop import BBO_METHODS, round_config
from sqdf.bbo.proxy import ProxyEnsemble, ProxyReward
from sqdf.config.train_config import config_fields
from sqdf.cost.report import RewardSwap
from sqdf.rewards.custom import check_findable
from sqdf.run.settings import DICT_KEYS, Resolved
from sqdf.tasks import resolved_reward_name
from sqdf.training.dry_run import dry_run_text


def bbo_sources(resolved: Resolved, flags: set[str]) -> dict[str, str]:
    """The layer of every BboConfig value: ``flags`` (names given on the command line), the
    preset's or the --config file's [bbo] table, else the built-in default."""
    return {
        f.name: "flags" if f.name in flags else resolved.source_of(f"bbo.{f.name}")
        for f in bbo_fields()
    }


def _round_resolved(resolved: Resolved, bbo: BboConfig, method: str) -> Resolved:
    """Method ``method``'s round config as layered settings: the experiment's, with each
    value that sqdf bbo sets for the round credited to it."""
    base = resolved.config()
    cfg = round_config(base, method, bbo, 0)
    sources = dict(resolved.sources)
    mine = f"sqdf bbo ({method}'s rounds)"
    for f in config_fields():
        new, old = getattr(cfg, f.name), getattr(base, f.name)
        if f.name in DICT_KEYS:
            for sub in new:
                if sub not in old or new[sub] != old[sub]:
                    sources[f"{f.name}.{sub}"] = mine
        elif new != old:
            sources[f.name] = mine
    return Resolved(cfg.to_dict(), sources, preset=resolved.preset)


FEATURES = {
    "gmm2d": "the raw coordinates",
    "digits": "the digit evaluator's penultimate activations",
    "sd": "the CLIP image embeddings",
}  # sqdf.bbo.proxy.feature_map's


def proxy_swap(bbo: BboConfig, task: str) -> RewardSwap:
    """The proxy a fine-tuning update scores with, built on meta over the traced reward's
    CLIP as ``feature_map`` builds it over the task reward's (fitted weights or not, its calls
    and sizes are the same)."""
    draw = "one member drawn a round" if bbo.optimism == "sample" else f"UCB, kappa {bbo.kappa:g}"
    label = (
        f"the BBO proxy ({bbo.ensemble_size} one-hidden-layer MLPs of {bbo.proxy_hidden} units "
        f"on {FEATURES.get(task, 'the task features')}, {draw})"
    )

    def build(reward: Any) -> ProxyReward:
        clip = reward.clip_model
        dim = int(clip.model.config.projection_dim)
        ensemble = ProxyEnsemble(dim, bbo.ensemble_size, bbo.proxy_hidden).to("meta")
        ensemble.requires_grad_(False)  # fitted, then frozen: gradients flow through it only
        member = 0 if bbo.optimism == "sample" else None
        return ProxyReward(bbo.kappa, member, ensemble, clip.image_features)

    return RewardSwap(label, build)


def bbo_dry_run_text(
    resolved: Resolved,
    bbo: BboConfig,
    sources: dict[str, str],
    methods: list[str],
    seeds: int,
    processes: int = 1,
    gpu_memory: int | None = None,
) -> str:
    """The report of ``sqdf bbo --dry-run``: the experiment's checks pass (as a run's would
    before it makes its folder), its BBO settings, its size, then the first training method's
    round as ``sqdf train --dry-run`` shows a run (settings, cost of one update against the
    proxy, fit, weights)."""
    base = resolved.config()
    check_experiment(bbo, base, methods, seeds)
    lines = [
        "sqdf bbo --dry-run: nothing is sampled, queried or trained; the experiment would use "
        "(value, from)"
    ]
    for f in bbo_fields():
        value = getattr(bbo, f.name)
        shown = value if f.name != "query_schedule" or value else "[] (queries_per_round)"
        lines.append(f"  bbo.{f.name:<24} {str(shown):<28} {sources[f.name]}")
    if bbo.oracle == "task":
        oracle = f"the task's reward {resolved_reward_name(base)!r}"
    else:
        check_findable(bbo.oracle, "oracle")
        oracle = f"{bbo.oracle} (found; imported by the run alone)"
    fine_tuned = bbo.rounds - 1  # the last round's queries measure; nothing follows them
    lines += [
        f"oracle: {oracle}; {bbo.schedule_text()} = {bbo.budget:,} queries per method and seed",
        f"fine-tuning: after each round but the last, {fine_tuned} x {bbo.updates_per_round} "
        f"= {fine_tuned * bbo.updates_per_round:,} updates per method and seed; the proxy "
        f"refitted each time on every query so far ({bbo.ensemble_size} members x "
        f"{bbo.proxy_steps} full-batch Adam steps; that fit, the features it reads and the "
        "round's sampling are not in the cost below)",
    ]
    named = []
    for m in methods:
        spec = BBO_METHODS[m]
        if spec.train_method is None:
            named.append(f"{m} (no training)")
            continue
        against = "the proxy" if spec.proxy else "the oracle's values"
        named.append(f"{m} ({spec.train_method} against {against})")
    lines.append(f"methods: {', '.join(named)}; seeds 0..{seeds - 1}: {len(methods) * seeds} "
                 f"runs, {len(methods) * seeds * bbo.budget:,} oracle queries in all")  # fmt: skip
    trained = [m for m in methods if BBO_METHODS[m].train_method is not None]
    if not trained:
        lines.append("no method trains: the run samples from the model and queries the oracle")
        return (
            "\n".join(lines)
            + "\n"
            + dry_run_text(resolved, processes, gpu_memory, cost=False, check_reward=False)
        )
    method = trained[0]
    spec = BBO_METHODS[method]
    also = f" (another method's: --methods NAME --dry-run; here {', '.join(trained[1:])})"
    lines.append(
        f"each fine-tuning round of {method} is this sqdf train run"
        + (also if len(trained) > 1 else "")
        + ":"
    )
    swap = proxy_swap(bbo, base.task) if spec.proxy else None
    title = f"{method}'s rounds (value, from):"
    round_text = dry_run_text(
        _round_resolved(resolved, bbo, method),
        processes,
        gpu_memory,
        title=title,
        swap=swap,
        check_reward=False,  # a round trains on the proxy or the oracle's values, as train
    )
    return "\n".join(lines) + "\n" + round_text
