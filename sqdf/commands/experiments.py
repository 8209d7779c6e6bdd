"""sqdf compare and sqdf bbo: methods side by side, at one budget of updates or of oracle
queries."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from sqdf.commands.args import (
    add_gpu_memory_flag,
    add_setting_flags,
    card_memory,
    default_out,
    key_and_values,
    key_values,
    setting_flags,
)
from sqdf.commands.train import not_a_bbo_preset
from sqdf.config.train_config import read_toml
from sqdf.errors import SqdfError
from sqdf.run.settings import resolve_settings

COMPARE_DEFAULT_METHODS = "sqdf,draft,alignprop,ddpo"
BBO_DEFAULT_METHODS = "sqdf,seiko,ddpo,best_of_n"


def _cmd_compare(args: argparse.Namespace) -> int:
    from sqdf.experiments.compare import compare, resume_compare

    if args.resume:  # the folder's own arguments; only --no-progress may be given
        given = (args.task, args.methods, args.out, args.config, args.preset, args.steps,
                 args.sweep, args.num_samples, args.best_of)  # fmt: skip
        others = args.set or args.frontier or args.bbo or setting_flags(args)
        if any(v is not None for v in given) or others:
            raise SqdfError("--resume takes the folder's own settings; give no other options")
        return _print_compare(resume_compare(args.resume, progress=not args.no_progress), False)
    if args.bbo:
        own = {"--steps": args.steps, "--sweep": args.sweep, "--num-samples": args.num_samples,
               "--best-of": args.best_of}  # fmt: skip
        for flag, value in own.items():
            if value is not None:
                raise SqdfError(
                    f"{flag} is not a --bbo setting (a BBO run is sized by --rounds, "
                    "--queries-per-round and --updates-per-round)"
                )
        return _run_bbo(args, args.task, args.methods)
    stray = [f"--{k.replace('_', '-')}" for k in _bbo_given(args)]
    stray += ["--oracle-param"] if args.oracle_params else []
    if stray:
        raise SqdfError(f"{stray[0]} is a BBO setting; add --bbo to compare BBO methods")
    flags = _set_flags(args)
    if args.task:
        flags["task"] = args.task
    if args.steps is not None:
        flags["steps"] = args.steps
    not_a_bbo_preset(args.preset, "add --bbo")
    resolved = resolve_settings(
        flags=flags, config_file=read_toml(args.config) if args.config else None,
        config_name=args.config or "--config", preset=args.preset,
    )  # fmt: skip
    if resolved.bbo:
        raise SqdfError(f"{args.config}: a [bbo] table needs --bbo")
    base = resolved.values
    sweep = key_and_values(args.sweep, "--sweep", "KEY") if args.sweep else None
    frontier_values: dict[str, list[Any]] = {}
    for item in args.frontier_values:
        method, values = key_and_values(item, "--frontier-values", "METHOD")
        if method in frontier_values:
            raise SqdfError(f"--frontier-values gives {method!r} twice")
        frontier_values[method] = values
    methods = [m.strip() for m in (args.methods or COMPARE_DEFAULT_METHODS).split(",")]
    methods = [m for m in methods if m]
    out = args.out or default_out(f"compare-{resolved.task}")
    folder = compare(
        base,
        methods,
        args.seeds,
        out,
        sweep=sweep,
        num_samples=args.num_samples,
        best_of=16 if args.best_of is None else args.best_of,
        frontier=args.frontier,
        frontier_values=frontier_values or None,
        progress=not args.no_progress,
    )
    return _print_compare(folder, args.frontier)


def _set_flags(args: argparse.Namespace) -> dict[str, Any]:
    """sqdf compare's and sqdf bbo's config values: --set KEY=VALUE items, with the
    parameter flags (--model, --task-param ...) merged over any table --set gives."""
    flags = key_values(args.set, "--set")
    for key, table in setting_flags(args).items():
        flags[key] = {**(flags[key] if isinstance(flags.get(key), dict) else {}), **table}
    return flags


def _print_compare(folder: Path, frontier: bool) -> int:
    print((folder / "results.md").read_text())
    written = "results.json, results.md, pareto.png, curves.png"
    if frontier or (folder / "frontier.md").is_file():
        print((folder / "frontier.md").read_text())
        written += ", frontier.json, frontier.md, frontier.png"
    print(f"wrote {folder}/{written}")
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    from sqdf.bbo.loop import BBO_METHODS

    c = sub.add_parser(
        "compare", help="every method (or every value of one setting) on the same seeds and budget",
        description="Train and evaluate several methods, or one method over several values of "
        "a setting (--sweep), on seeds 0..N-1 with the same updates and batch sizes. Writes "
        "results.json, results.md (mean ± std), pareto.png, curves.png (and samples.png on "
        "gmm2d); with --frontier, each method over its own regularisation and the reward-KL "
        "frontier.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  sqdf compare --task gmm2d --methods sqdf,draft,alignprop,ddpo --seeds 2\n"
        "  sqdf compare --task gmm2d --methods sqdf --sweep gamma=1.0,0.9,0.7 --seeds 3\n"
        "  sqdf compare --task gmm2d --frontier --methods sqdf,draft_kl,draft,best_of_n\n"
        "  sqdf compare --task digits --methods sqdf,draft,best_of_n --set alpha=0.1 --steps 60\n"
        "  sqdf compare --bbo --task gmm2d --set reward=quadratic \\\n"
        "      --methods sqdf,seiko,best_of_n --rounds 4 --queries-per-round 64\n\n"
        "With --bbo the methods meet at the same number of oracle queries instead of updates: "
        "the same\nexperiment and outputs as sqdf bbo (see sqdf bbo --help), resumable with "
        "sqdf bbo --resume DIR.",
    )  # fmt: skip
    c.add_argument(
        "--task", default=None,
        help="gmm2d, digits or sd (default: the --config file's task, else gmm2d)",
    )  # fmt: skip
    c.add_argument(
        "--methods",
        default=None,
        help="comma-separated: sqdf, draft, draft_lv, draft_kl, refl, alignprop, ddpo, grpo, "
        f"best_of_n (default: {COMPARE_DEFAULT_METHODS}); with --bbo: "
        f"{', '.join(BBO_METHODS)} (default: {BBO_DEFAULT_METHODS}; without best_of_n when "
        "the query schedule varies)",
    )
    c.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 (default: 2)")
    c.add_argument("--out", default=None, help="output folder (default: runs/compare-TASK-TIME)")
    c.add_argument("--config", default=None, help="TOML file with the shared config keys")
    c.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a shared config key, e.g. alpha=1.0 (repeatable)",
    )
    add_setting_flags(c)
    c.add_argument("--steps", type=int, default=None, help="optimizer updates per run")
    c.add_argument(
        "--sweep",
        default=None,
        metavar="KEY=V1,V2",
        help="ablation: one run per value of KEY, for the first method",
    )
    c.add_argument(
        "--frontier", action="store_true",
        help="each method over its regularisation instead of one run: alpha for sqdf and "
        "draft_kl (4, 2, 1, 0.5, 0.25 x the base's), beta for grpo (4, 1, 0.25, 0 x the "
        "base's alpha), N for best_of_n (2, 4, 16, 64), updates "
        "for the methods without a KL term (0.25, 0.5, 1 x the base's); writes frontier.png "
        "and frontier.md, reward against path KL (on gmm2d with the exact frontier and every "
        "run's distance to it)",
    )  # fmt: skip
    c.add_argument(
        "--frontier-values", action="append", default=[], metavar="METHOD=V1,V2",
        help="with --frontier: the values of METHOD's setting instead of the defaults "
        "(repeatable), e.g. sqdf=4,1,0.25",
    )  # fmt: skip
    c.add_argument("--num-samples", type=int, default=None, help="evaluation samples per run")
    c.add_argument("--best-of", type=int, default=None, help="N for best_of_n (default: 16)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")  # fmt: skip
    c.add_argument(
        "--resume", metavar="DIR", default=None,
        help="continue DIR after an interruption: its finished variants are kept",
    )  # fmt: skip
    g = c.add_argument_group(
        "online black-box optimisation (--bbo)",
        "the methods compared at a query budget against an oracle, as sqdf bbo runs them",
    )
    g.add_argument("--bbo", action="store_true", help="compare BBO methods at a query budget")
    _add_bbo_options(g)


BBO_EPILOG = """\
examples:
  sqdf bbo --task gmm2d --set reward=quadratic --rounds 4 --queries-per-round 64 --out runs/bbo
  sqdf bbo --task digits --config docs/results/digits.toml --methods sqdf,seiko,best_of_n
  sqdf bbo --oracle my_pkg.oracles:score --oracle-param scale=2.0 --drop-bad-queries
  sqdf bbo --preset sd15-bbo-aesthetic --methods sqdf,seiko --out runs/sd-bbo
  sqdf bbo --preset sd15-bbo-aesthetic --dry-run --gpu-memory 24GiB   # cost, fit, downloads
  sqdf bbo --resume runs/bbo      # continue after an interruption; nothing is queried twice

Each round samples --queries-per-round samples from the current model, sends them to the
oracle (the task's reward by default, or module:function called as f(samples, classes,
**oracle_params) returning one float per sample), fits a bootstrap proxy ensemble on every
query so far and fine-tunes against its UCB. --set takes the same keys as sqdf train (and
a --config file may add a [bbo] table of the flags below). Writes DIR/runs/METHOD-seedN/
(queries/, rounds.jsonl, proxy/, checkpoints/), results.json, results.md, bbo_curve.png."""


def _add_bbo(sub: argparse._SubParsersAction) -> None:
    from sqdf.bbo.loop import BBO_METHODS

    b = sub.add_parser(
        "bbo",
        help="online black-box optimisation against an oracle with a query budget",
        description="Fine-tune against a proxy of an expensive oracle, round by round, and "
        "compare methods at the same number of oracle queries.",
        epilog=BBO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--task", default=None, help="gmm2d, digits or sd (default: gmm2d)")
    b.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated: {', '.join(BBO_METHODS)} (default: {BBO_DEFAULT_METHODS}; "
        "without best_of_n where the query schedule varies)",
    )
    b.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 (default: 2)")
    b.add_argument("--out", default=None, help="output folder (default: runs/bbo-TASK-TIME)")
    b.add_argument("--resume", metavar="DIR", help="continue DIR from its last completed round")
    b.add_argument("--config", default=None, help="TOML file: train keys and a [bbo] table")
    b.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a train config key, e.g. alpha=1.0 (repeatable)",
    )  # fmt: skip
    add_setting_flags(b)
    b.add_argument("--no-progress", action="store_true", help="no progress lines")
    b.add_argument(
        "--dry-run", action="store_true",
        help="print the BBO settings and where each came from, the query budget, and the "
        "first training method's round as sqdf train --dry-run shows a run (its settings, "
        "the FLOPs and traced GPU memory of one update against the proxy, the weights); "
        "sample, query and train nothing",
    )  # fmt: skip
    add_gpu_memory_flag(b)
    _add_bbo_options(b)


def _add_bbo_options(parser: argparse.ArgumentParser) -> None:
    """The BboConfig flags (shared by sqdf bbo and sqdf compare --bbo)."""
    from sqdf.bbo.config import bbo_fields

    parser.add_argument(
        "--oracle-param", dest="oracle_params", action="append", default=[],
        metavar="KEY=VALUE", help="oracle parameter for module:function (repeatable)",
    )  # fmt: skip
    for f in bbo_fields():
        if f.name == "oracle_params":
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action="store_true", default=None,
                                help=f.metadata["help"])  # fmt: skip
            continue
        kind = {"int": int, "float": float, "str": str, "list": _int_list}[str(f.type)]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(
            flag, dest=f.name, type=kind, default=None,
            help=f"{f.metadata['help']} (default: {default})",
        )  # fmt: skip


def _int_list(text: str) -> list[int]:
    """'1024,2048' as [1024, 2048] (an argparse type: a bad item is a one-line error)."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
        if not values:
            raise ValueError
        return values
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None


def _bbo_given(args: argparse.Namespace) -> dict[str, Any]:
    """The BboConfig flags given on the command line."""
    from sqdf.bbo.config import bbo_fields

    given = {f.name: getattr(args, f.name) for f in bbo_fields() if f.name != "oracle_params"}
    return {k: v for k, v in given.items() if v is not None}


def _cmd_bbo(args: argparse.Namespace) -> int:
    from sqdf.bbo import resume_bbo

    if args.resume:
        others = (args.config or args.preset or args.set or args.oracle_params
                  or _bbo_given(args) or setting_flags(args) or args.dry_run
                  or args.gpu_memory)  # fmt: skip
        if others or args.task or args.out or args.methods:
            raise SqdfError("--resume takes the folder's own settings; give no other options")
        folder = resume_bbo(args.resume, progress=not args.no_progress)
        return _print_bbo(folder)
    return _run_bbo(args, args.task, args.methods)


def _run_bbo(args: argparse.Namespace, task: str | None, methods: str | None) -> int:
    """A new BBO experiment (or, sqdf bbo --dry-run, its report) from sqdf bbo's or sqdf
    compare --bbo's arguments; ``methods`` None: the default ones."""
    from sqdf.bbo import BboConfig, run_bbo
    from sqdf.config.params import build_settings

    memory = card_memory(args) if hasattr(args, "gpu_memory") else None  # compare --bbo: none
    flags = _set_flags(args)
    if task:
        flags["task"] = task
    resolved = resolve_settings(
        flags=flags, config_file=read_toml(args.config) if args.config else None,
        config_name=args.config or "--config", preset=args.preset,
    )  # fmt: skip
    bbo_values = {**resolved.bbo, **_bbo_given(args)}
    if bbo_values.get("query_schedule") and "queries_per_round" in bbo_values:
        raise SqdfError(
            "give query_schedule or queries_per_round, not both (the schedule sizes every round)"
        )
    oracle_params = key_values(args.oracle_params, "--oracle-param")
    if oracle_params:
        bbo_values["oracle_params"] = {**bbo_values.get("oracle_params", {}), **oracle_params}
    bbo = build_settings(BboConfig, bbo_values, "bbo")
    base = resolved.config()
    if methods is None:  # best_of_n needs the same queries every round
        methods = BBO_DEFAULT_METHODS
        if len(set(bbo.query_schedule)) > 1:
            methods = methods.replace(",best_of_n", "")
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if getattr(args, "dry_run", False):
        from sqdf.bbo.dry_run import bbo_dry_run_text, bbo_sources
        from sqdf.infra.distributed import launched

        given = set(_bbo_given(args)) | ({"oracle_params"} if oracle_params else set())
        text = bbo_dry_run_text(
            resolved, bbo, bbo_sources(resolved, given), names, args.seeds,
            processes=max(launched()[1], 1), gpu_memory=memory,
        )  # fmt: skip
        print(text)
        return 0
    out = args.out or default_out(f"bbo-{base.task}")
    return _print_bbo(run_bbo(bbo, base, names, args.seeds, out, progress=not args.no_progress))


def _print_bbo(folder: Path) -> int:
    print((folder / "results.md").read_text())
    print(f"wrote {folder}/results.json, results.md, bbo_curve.png and runs/ (query data)")
    print(f"(continue it after an interruption with: sqdf bbo --resume {folder})")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_compare(sub)
    _add_bbo(sub)


HANDLERS = {"compare": _cmd_compare, "bbo": _cmd_bbo}
