"""Command line: argument parsing only; every command is a library call."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from sqdf.atomic import folder_writes
from sqdf.config import config_fields, read_toml, tomllib
from sqdf.distributed import launched
from sqdf.errors import SqdfError
from sqdf.evaluate import EVAL_SEED
from sqdf.preemption import Preempted
from sqdf.settings import Resolved, config_sources, make_config, resolve_settings
from sqdf.tasks import resolve_device
from sqdf.weights import clear as clear_weights

DESCRIPTION = """\
Fine-tune diffusion models on a reward with SQDF (Soft Q-based Diffusion Fine-tuning):
a reparameterised policy gradient of a training-free soft Q-function, KL-regularised to
the pretrained model so samples stay natural and diverse."""

TRAIN_EPILOG = """\
examples:
  sqdf train --task gmm2d --steps 300 --out runs/gmm2d
  sqdf train --config my.toml --alpha 1.0 --reward-param 'b=[0.0, 1.0]'
  sqdf train --resume runs/gmm2d --steps 600      # continue (and extend) a run
  sqdf train --preset sd15-aesthetic --model ~/sd15 --task-param lcm=~/lcm-lora.safetensors \
      --reward-param clip=~/clip-l14 --reward-param head=~/aesthetic.safetensors --out runs/sd
  sqdf train --preset sd15-aesthetic --model ~/sd15 ... --dry-run   # what would run
  sqdf train --task sd --model ~/sdxl --task-param resolution=512 ...  # SDXL, by its folder

The sd task reads the family from the folder's model_index.json: StableDiffusionPipeline
(SD 1.x/2.x), StableDiffusionXLPipeline (SDXL), StableDiffusion3Pipeline (SD 3/3.5) or
FluxPipeline (FLUX.1).

settings: built-in defaults < the task's defaults < --preset < --config < flags. The sd
task's defaults are the official SQDF aesthetic run's (batch 4 x 8 accumulation per process,
alpha 2.0 in the reference code's per-dimension convention, 2,000 updates); digits' are the
demo's. --dry-run shows every value and where it came from.

task parameters (--task-param KEY=VALUE; README for their meaning):
  gmm2d   num_modes, radius, std, means, stds, weights, hidden, ode_steps, process,
          noise_level, shift
  digits  model, cm, guidance, lora_rank, lora_alpha, lora_targets, classes, finetune,
          compile, channels_last
  sd      model, prompts, eval_prompts, negative_prompt, guidance, true_cfg, resolution,
          lora_rank, lora_alpha, lora_targets, lcm, lcm_guidance, dtype,
          gradient_checkpointing, finetune, compile, channels_last, noise_level

A TOML config holds the same keys as the flags (underscores), with [task_params] and
[reward_params] tables. Flags override the file. The resolved configuration is written to
RUN/config.json."""

SAMPLE_EPILOG = """\
examples:
  sqdf sample runs/gmm2d --num-samples 2048
  sqdf sample --task sd --model ~/sd15 --lora runs/sd/final --prompts animals --out grid.png"""


WRITES_TO_RUN = ("eval", "report", "sample")
DICT_FIELDS = {"task_params": "--task-param", "reward_params": "--reward-param",
               "method_params": "--method-param"}  # fmt: skip


COMPARE_DEFAULT_METHODS = "sqdf,draft,alignprop,ddpo"
BBO_DEFAULT_METHODS = "sqdf,seiko,ddpo,best_of_n"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_value(text: str) -> Any:
    """A TOML value (number, list, bool, quoted string), else the text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def key_values(items: list[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` items (values read as TOML, else as text), as every sqdf flag reads them."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SqdfError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a model (writes a run folder)",
        description=DESCRIPTION,
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with config keys")
    p.add_argument(
        "--preset", metavar="NAME",
        help="a shipped configuration of a published run (sqdf presets lists them)",
    )  # fmt: skip
    p.add_argument(
        "--dry-run", action="store_true",
        help="print every resolved setting and where it came from, the model's D, alpha in "
        "both conventions, the effective batch and the replay buffer's memory; train nothing",
    )  # fmt: skip
    p.add_argument("--out", metavar="RUN", help="run folder (default: runs/TASK-METHOD-TIME)")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint")
    for key, example in (
        ("task_params", "radius=4.0"),
        ("reward_params", "'b=[1.0, 0.0]'"),
        ("method_params", "k=2 (draft)"),
    ):
        p.add_argument(
            DICT_FIELDS[key],
            dest=key,
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"{key[:-7]} parameter, e.g. {example} (repeatable)",
        )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--model", metavar="PATH",
        help="sd: local diffusers folder, SD 1.x/2.x, SDXL, SD 3/3.5 or FLUX.1 "
        "(= --task-param model=)",
    )  # fmt: skip
    p.add_argument("--prompts", metavar="SET|FILE", help="sd: prompts (= --task-param prompts=)")
    for f in config_fields():
        if f.name in DICT_FIELDS:
            continue
        kind = {"int": int, "float": float, "str": str}[str(f.type)]
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=kind,
            default=None,
            help=f"{f.metadata['help']} (built-in default: {f.default}; tasks may set their own)",
        )


def _default_out(name: str) -> str:
    if launched()[1] > 1:  # the processes' clocks may read different seconds
        raise SqdfError("give --out when launching several processes (they share one folder)")
    return f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _train_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The config values given as flags: plain keys, KEY=VALUE parameters, --model/--prompts."""
    flags = {f.name: getattr(args, f.name) for f in config_fields() if hasattr(args, f.name)}
    flags = {k: v for k, v in flags.items() if v is not None and k not in DICT_FIELDS}
    for key, flag in DICT_FIELDS.items():
        given = key_values(getattr(args, key), flag)
        if given:
            flags[key] = given
    for key in ("model", "prompts"):  # shorthands for the sd task's most used parameters
        if getattr(args, key):
            flags.setdefault("task_params", {})[key] = getattr(args, key)
    return flags


def _resumed_settings(args: argparse.Namespace, flags: dict[str, Any]) -> Resolved:
    """A run's own config with the flags that may change on resume (e.g. --steps) over it."""
    from sqdf.run import config_path, read_run_config

    if args.config or args.preset or any(key in flags for key in DICT_FIELDS):
        raise SqdfError(
            "--resume takes the run's own config; only flags like --steps may change "
            "(not --config, --preset, --model, --prompts or parameters)"
        )
    saved = read_run_config(args.resume).to_dict()
    sources = json.loads(config_path(Path(args.resume)).read_text()).get("sources")
    if sources is None:  # written before sources were recorded
        unknown = f"{args.resume}/config.json (source not recorded)"
        sources = {k: unknown for k in config_sources(make_config(saved), {})}
    return Resolved({**saved, **flags}, {**sources, **{k: "flags" for k in flags}})


def _not_a_bbo_preset(name: str | None, what_to_do: str) -> None:
    from sqdf.settings import load_preset

    if name and load_preset(name).is_bbo:
        raise SqdfError(f"preset {name!r} is an online BBO experiment: {what_to_do}")


def _cmd_train(args: argparse.Namespace) -> int:
    from sqdf.trainer import train

    flags = _train_flags(args)
    if args.resume:
        resolved = _resumed_settings(args, flags)
    else:
        _not_a_bbo_preset(args.preset, "run it with sqdf bbo --preset")
        resolved = resolve_settings(
            flags=flags,
            config_file=read_toml(args.config) if args.config else None,
            config_name=args.config or "--config",
            preset=args.preset,
        )
        if resolved.bbo:
            raise SqdfError(f"{args.config}: a [bbo] table is for sqdf bbo, not sqdf train")
    if args.dry_run:
        from sqdf.dry_run import dry_run_text

        print(dry_run_text(resolved, processes=max(launched()[1], 1)))
        return 0
    cfg = resolved.config()
    out = args.resume or args.out or _default_out(f"{cfg.task}-{cfg.method}")
    run = train(
        cfg, out, resume=bool(args.resume), progress=not args.no_progress,
        sources=resolved.sources,
    )  # fmt: skip
    print(f"run folder: {run}\nnext: sqdf eval {run}   (or: sqdf sample {run})")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from sqdf.settings import load_preset, preset_names

    if not args.name:
        for name in preset_names():
            print(f"{name:<22} {load_preset(name).description}")
        print("\nsqdf presets NAME shows one in full; sqdf train --preset NAME ... runs it")
        return 0
    preset = load_preset(args.name)
    command = "sqdf bbo" if preset.is_bbo else "sqdf train"
    print(f"{preset.name}: {preset.description}\n\nsource: {preset.source}")
    if preset.notes:
        print(f"notes: {preset.notes}")
    if preset.needs:
        print(f"\n{command} --preset {preset.name} needs:")
        for hint in preset.needs.values():
            print(f"  {hint}")
    else:
        print(
            f"\n{command} --preset {preset.name} needs no paths: its weights are fetched "
            "from the Hub on first use (--dry-run lists them and their sizes; docs/weights.md)"
        )
    print("\nsettings (over the task defaults; --dry-run shows every value and its source):")
    for key, value in preset.train.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                print(f"  {key}.{sub} = {v!r}")
        else:
            print(f"  {key} = {value!r}")
    for key, value in preset.bbo.items():
        print(f"  bbo.{key} = {value!r}")
    return 0


def reward_choices(names: str | None, params: list[str]) -> dict[str, dict[str, Any]]:
    """``--rewards a,b`` with ``--reward-param NAME.KEY=VALUE`` items: name -> parameters."""
    chosen: dict[str, dict[str, Any]] = {}
    for name in (names or "").split(","):
        if name.strip():
            chosen[name.strip()] = {}
    for item in params:
        left, sep, _ = item.partition("=")
        name, dot, key = left.rpartition(".")
        if not sep or not dot or not name or not key:
            raise SqdfError(f"--reward-param expects NAME.KEY=VALUE, got {item!r}")
        if name.strip() not in chosen:
            raise SqdfError(
                f"--reward-param {item!r}: reward {name.strip()!r} is not in --rewards "
                f"({', '.join(chosen) or 'none given'})"
            )
        chosen[name.strip()].update(key_values([item[len(name) + 1 :]], "--reward-param"))
    return chosen


def _cmd_eval(args: argparse.Namespace) -> int:
    from sqdf.evaluate import evaluate_run

    metrics = evaluate_run(
        args.run,
        num_samples=args.num_samples,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        rewards=reward_choices(args.rewards, args.reward_param),
        prompts=args.prompts,
        per_prompt=args.per_prompt,
        clip=args.clip,
        lpips=args.lpips,
        dreamsim=args.dreamsim,
        dreamsim_type=args.dreamsim_type,
        fid=args.fid,
    )
    print(json.dumps({k: v for k, v in metrics.items() if k != "per_prompt"}, indent=1))
    written = ["eval.json", "eval.md"] if "per_prompt" in metrics else ["eval.json"]
    print("wrote " + ", ".join(str(Path(args.run) / name) for name in written))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from sqdf.evaluate import sample_run

    if args.task == "sd":
        from sqdf.render import render_sd

        if not args.model:
            raise SqdfError(
                "sqdf sample --task sd needs --model PATH (a local SD 1.x/2.x, SDXL, SD 3/3.5 or "
                "FLUX.1 folder)"
            )
        picture = render_sd(
            args.model, args.lora, args.prompts, args.out or "sd_samples.png",
            num_images=8 if args.num_samples is None else args.num_samples, seed=args.seed,
            guidance=args.guidance, num_steps=args.num_steps, device=args.device,
        )  # fmt: skip
        print(f"wrote {picture}")
        return 0
    if not args.run:
        raise SqdfError("give a run folder (or --task sd --model PATH --lora RUN/final)")
    picture = sample_run(
        args.run,
        num_samples=1024 if args.num_samples is None else args.num_samples,
        seed=args.seed,
        out=args.out,
        with_reference=not args.no_reference,
    )
    print(f"wrote {picture} and {picture.with_suffix('.safetensors')}")
    return 0


def _cmd_convert_head(args: argparse.Namespace) -> int:
    from sqdf.rewards.clip_rewards import convert_aesthetic_head

    print(f"wrote {convert_aesthetic_head(args.pth, args.out)}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from sqdf.run_report import write_run_report

    page = write_run_report(args.run, device=args.device, progress=not args.no_progress)
    print(f"wrote {page}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sqdf.demo import run_demo, summary_rows

    t0 = time.perf_counter()
    overrides = {"steps": args.steps} if args.steps is not None else {}
    page = run_demo(
        args.out, num_samples=args.num_samples, progress=not args.no_progress, **overrides
    )
    metrics = json.loads((page.parent / "eval.json").read_text())
    print(f"\n{'metric':<38}{'before':>10}{'after':>10}{'real':>10}")
    for label, before, after, real in summary_rows(metrics):
        real_text = f"{real:>10.3f}" if real is not None else f"{'':>10}"
        print(f"{label:<38}{before:>10.3f}{after:>10.3f}{real_text}")
    print(f"\nreport: {page}   ({time.perf_counter() - t0:.0f} s in all)")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from sqdf.compare import compare, resume_compare

    if args.resume:  # the folder's own arguments; only --no-progress may be given
        given = (args.task, args.methods, args.out, args.config, args.preset, args.steps,
                 args.sweep, args.num_samples, args.best_of)  # fmt: skip
        if any(v is not None for v in given) or args.set or args.frontier or args.bbo:
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
        return _run_bbo(args, args.task, args.methods or BBO_DEFAULT_METHODS)
    stray = [f"--{k.replace('_', '-')}" for k in _bbo_given(args)]
    stray += ["--oracle-param"] if args.oracle_params else []
    if stray:
        raise SqdfError(f"{stray[0]} is a BBO setting; add --bbo to compare BBO methods")
    flags = key_values(args.set, "--set")
    if args.task:
        flags["task"] = args.task
    if args.steps is not None:
        flags["steps"] = args.steps
    _not_a_bbo_preset(args.preset, "add --bbo")
    resolved = resolve_settings(
        flags=flags, config_file=read_toml(args.config) if args.config else None,
        config_name=args.config or "--config", preset=args.preset,
    )  # fmt: skip
    if resolved.bbo:
        raise SqdfError(f"{args.config}: a [bbo] table needs --bbo")
    base = resolved.values
    sweep = _key_and_values(args.sweep, "--sweep", "KEY") if args.sweep else None
    frontier_values: dict[str, list[Any]] = {}
    for item in args.frontier_values:
        method, values = _key_and_values(item, "--frontier-values", "METHOD")
        if method in frontier_values:
            raise SqdfError(f"--frontier-values gives {method!r} twice")
        frontier_values[method] = values
    methods = [m.strip() for m in (args.methods or COMPARE_DEFAULT_METHODS).split(",")]
    methods = [m for m in methods if m]
    out = args.out or _default_out(f"compare-{base['task']}")
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


def _print_compare(folder: Path, frontier: bool) -> int:
    print((folder / "results.md").read_text())
    written = "results.json, results.md, pareto.png, curves.png"
    if frontier or (folder / "frontier.md").is_file():
        print((folder / "frontier.md").read_text())
        written += ", frontier.json, frontier.md, frontier.png"
    print(f"wrote {folder}/{written}")
    return 0


def _key_and_values(text: str, flag: str, what: str) -> tuple[str, list[Any]]:
    """``KEY=V1,V2,...`` (or ``KEY=[V1, V2]``), each value read as TOML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or not raw:
        raise SqdfError(f"{flag} expects {what}=V1,V2,..., got {text!r}")
    values = _parse_value(raw) if raw.startswith("[") else [_parse_value(v) for v in raw.split(",")]
    return key.strip(), list(values)


def _only_digits(task: str) -> None:
    if task != "digits":
        raise SqdfError(
            f"--task {task}: only 'digits' has shipped weights to rebuild "
            "(gmm2d's reference is exact)"
        )


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from sqdf.pretrain import PretrainConfig, pretrain_digits

    _only_digits(args.task)
    out = pretrain_digits(
        args.out,
        PretrainConfig(steps=args.steps, seed=args.seed),
        progress=not args.no_progress,
        device=str(resolve_device(args.device)),
    )
    print(f"wrote {out}/unet and {out}/scheduler")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from sqdf.distill import DistillConfig, distill_cm

    _only_digits(args.task)
    out = args.out or str(Path(args.base) / "cm")
    distill_cm(
        args.base,
        out,
        DistillConfig(steps=args.steps, seed=args.seed),
        progress=not args.no_progress,
        device=str(resolve_device(args.device)),
    )
    print(f"wrote {out}")
    return 0


def _cmd_train_reward(args: argparse.Namespace) -> int:
    from sqdf.rewards.digit_classifier import train_reward_cnn

    _only_digits(args.task)
    out = train_reward_cnn(
        args.out, steps=args.steps, seed=args.seed, progress=not args.no_progress
    )
    print(f"wrote {out} (held-out accuracy in {out.with_suffix('.json')})")
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
        f"{', '.join(BBO_METHODS)} (default: {BBO_DEFAULT_METHODS})",
    )
    c.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 (default: 2)")
    c.add_argument("--out", default=None, help="output folder (default: runs/compare-TASK-TIME)")
    c.add_argument("--config", default=None, help="TOML file with the shared config keys")
    c.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help="a shipped configuration (sqdf presets), under --config and --set",
    )
    c.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a shared config key, e.g. alpha=1.0 (repeatable)",
    )
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
        help=f"comma-separated: {', '.join(BBO_METHODS)} (default: {BBO_DEFAULT_METHODS})",
    )
    b.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 (default: 2)")
    b.add_argument("--out", default=None, help="output folder (default: runs/bbo-TASK-TIME)")
    b.add_argument("--resume", metavar="DIR", help="continue DIR from its last completed round")
    b.add_argument("--config", default=None, help="TOML file: train keys and a [bbo] table")
    b.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help="a shipped configuration (sqdf presets), under --config and --set",
    )
    b.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a train config key, e.g. alpha=1.0 (repeatable)",
    )  # fmt: skip
    b.add_argument("--no-progress", action="store_true", help="no progress lines")
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
        parser.add_argument(
            flag, dest=f.name, type=kind, default=None,
            help=f"{f.metadata['help']} (default: {f.default})",
        )  # fmt: skip


def _int_list(text: str) -> list[int]:
    """'1024,2048' as [1024, 2048] (an argparse type: a bad item is a one-line error)."""
    try:
        return [int(item) for item in text.split(",") if item.strip()]
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
        others = args.config or args.preset or args.set or args.oracle_params or _bbo_given(args)
        if others or args.task or args.out or args.methods:
            raise SqdfError("--resume takes the folder's own settings; give no other options")
        folder = resume_bbo(args.resume, progress=not args.no_progress)
        return _print_bbo(folder)
    return _run_bbo(args, args.task, args.methods or BBO_DEFAULT_METHODS)


def _run_bbo(args: argparse.Namespace, task: str | None, methods: str) -> int:
    """A new BBO experiment from sqdf bbo's or sqdf compare --bbo's arguments."""
    from sqdf.bbo import BboConfig, run_bbo
    from sqdf.params import build_settings

    flags = key_values(args.set, "--set")
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
    names = [m.strip() for m in methods.split(",") if m.strip()]
    out = args.out or _default_out(f"bbo-{base.task}")
    return _print_bbo(run_bbo(bbo, base, names, args.seeds, out, progress=not args.no_progress))


def _print_bbo(folder: Path) -> int:
    print((folder / "results.md").read_text())
    print(f"wrote {folder}/results.json, results.md, bbo_curve.png and runs/ (query data)")
    print(f"(continue it after an interruption with: sqdf bbo --resume {folder})")
    return 0


def _add_build_commands(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo",
        help="fine-tune the embedded digits model and write report.html",
        description="SQDF on the shipped digits model, ink reward, with the "
        "consistency-model Q, discount and prioritised replay; about 2-3 "
        "minutes on 2 CPU cores. Prints a before/after table and writes "
        "RUN/report.html.",
    )
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument("--steps", type=int, default=None, help="optimizer updates (default: 100)")
    d.add_argument("--num-samples", type=int, default=500, help="samples per model for metrics")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    common = [
        ("--seed", dict(type=int, default=0, help="random seed")),
        ("--no-progress", dict(action="store_true", help="no progress bar")),
    ]
    p = sub.add_parser("pretrain", help="rebuild the shipped digits base model")
    p.add_argument("--task", default="digits", help="digits (the only pretrained task)")
    p.add_argument("--out", required=True, help="folder for unet/ and scheduler/")
    p.add_argument("--steps", type=int, default=6000, help="training steps (default: 6000)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    c = sub.add_parser("distill-cm", help="rebuild the shipped digits consistency model")
    c.add_argument("--task", default="digits", help="digits (the only pretrained task)")
    c.add_argument("--base", required=True, help="base model folder (with unet/)")
    c.add_argument("--out", default=None, help="output folder (default: BASE/cm)")
    c.add_argument("--steps", type=int, default=2000, help="distillation steps (default: 2000)")
    c.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    r = sub.add_parser("train-reward", help="rebuild the shipped digit-classifier reward")
    r.add_argument("--task", default="digits", help="digits")
    r.add_argument("--out", required=True, help="output .safetensors file")
    r.add_argument("--steps", type=int, default=1500, help="training steps (default: 1500)")
    for q in (p, c, r):
        for flag, kw in common:
            q.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sqdf", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    e = sub.add_parser("eval", help="score a finished run against its reference (writes eval.json)")
    e.add_argument("run", metavar="RUN", help="run folder written by sqdf train")
    e.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="samples from policy and reference (default: gmm2d 4096, digits 1000)",
    )
    e.add_argument(
        "--rewards", metavar="NAME[,NAME...]", default=None,
        help="rewards the run was not trained on, scored beside its own (cross-rewards): "
        "aesthetic, pickscore, clipscore, hpsv2, imagereward, jpeg, ink, classifier, "
        "module:function",
    )  # fmt: skip
    e.add_argument(
        "--reward-param", action="append", default=[], metavar="NAME.KEY=VALUE",
        help="a parameter of a --rewards reward, e.g. pickscore.model=~/pickscore (repeatable)",
    )  # fmt: skip
    e.add_argument(
        "--prompts", default=None, metavar="SET|FILE",
        help="sd: held-out prompts, a built-in set or a file (default: the run's eval_prompts, "
        "animals-heldout unless set)",
    )  # fmt: skip
    e.add_argument(
        "--per-prompt", type=int, default=None, metavar="K",
        help="sd: images per prompt, from fixed seeds (default 4)",
    )  # fmt: skip
    e.add_argument(
        "--clip", default=None, metavar="FOLDER",
        help="sd: CLIP model folder for diversity and Fréchet features (default: the CLIP of the "
        "first reward that has one, else 32x32 pixels)",
    )  # fmt: skip
    e.add_argument(
        "--lpips", nargs="?", const=True, default=None, metavar="FILE",
        help="sd: LPIPS diversity (lpips package, AlexNet v0.1); FILE: torchvision's "
        "alexnet-owt-7be5be79.pth (or a safetensors file of its features.*), else torchvision "
        "fetches it into the torch hub cache",
    )  # fmt: skip
    e.add_argument(
        "--dreamsim", nargs="?", const=True, default=None, metavar="DIR",
        help="sd: DreamSim diversity (dreamsim package); DIR holds its unzipped checkpoint "
        "(default $TORCH_HOME/hub/dreamsim, where the package downloads it)",
    )  # fmt: skip
    e.add_argument(
        "--dreamsim-type", default=None, metavar="TYPE",
        help="sd: DreamSim's model: ensemble (default), dino_vitb16, clip_vitb32, "
        "open_clip_vitb32, dinov2_vitb14, synclr_vitb16",
    )  # fmt: skip
    e.add_argument(
        "--fid", nargs="?", const=True, default=None, metavar="FILE",
        help="sd: FID on Inception features between the fine-tuned and the reference images "
        "(torchmetrics, torch-fidelity's InceptionV3); FILE: "
        "weights-inception-2015-12-05-6726825d.pth, else torch-fidelity fetches it",
    )  # fmt: skip
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--seed", type=int, default=EVAL_SEED, help=f"sampling seed ({EVAL_SEED})")
    e.add_argument("--device", default=None, help="override the run's device")
    r = sub.add_parser(
        "report",
        help="one self-contained page for a run of any task (writes RUN/report.html)",
        description="What ran, fine-tuned beside reference samples from the same noise, "
        "training curves, pictures taken during training and the evaluation table. A run "
        "without eval.json is evaluated first, with sqdf eval's defaults.",
    )  # fmt: skip
    r.add_argument("run", metavar="RUN", help="run folder written by sqdf train")
    r.add_argument("--device", default=None, help="override the run's device")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = sub.add_parser(
        "sample",
        help="draw samples from a finished run and plot them",
        epilog=SAMPLE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("run", metavar="RUN", nargs="?", help="run folder written by sqdf train")
    s.add_argument("--num-samples", type=int, default=None, help="how many (default 1024; sd 8)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument(
        "--out",
        default=None,
        help="picture path (default: RUN/samples.png); the samples go beside it as .safetensors",
    )
    s.add_argument("--no-reference", action="store_true", help="skip the reference panel")
    s.add_argument("--task", choices=["sd"], help="sd: render with a plain diffusers pipeline")
    s.add_argument(
        "--model",
        metavar="PATH",
        help="sd: local SD 1.x/2.x, SDXL, SD 3/3.5 or FLUX.1 diffusers folder",
    )
    s.add_argument(
        "--lora",
        metavar="DIR",
        help="sd: the RUN/final folder of an sd run (its LoRA, or its fully fine-tuned unet/)",
    )
    s.add_argument(
        "--prompts", default=None,
        help="sd: built-in set or file (default: the run's, else animals)",
    )  # fmt: skip
    s.add_argument(
        "--guidance", type=float, default=None, help="sd: CFG scale (default: the run's, else 5.0)"
    )
    s.add_argument(
        "--num-steps",
        type=int,
        default=None,
        help="sd: sampling steps (default: the run's, else 50)",
    )
    s.add_argument("--device", default="auto", help="sd: torch device (auto)")
    c = sub.add_parser(
        "convert-aesthetic-head",
        help="the public LAION aesthetic head (.pth) as safetensors, read with weights_only",
    )
    c.add_argument("pth", metavar="IN.pth")
    c.add_argument("out", metavar="OUT.safetensors")
    pr = sub.add_parser(
        "presets",
        help="list the shipped presets (the settings of published runs), or show one",
        description="Presets are TOML files shipped in sqdf/presets/: the settings of a "
        "published run, over the task's defaults. Use one with sqdf train --preset NAME (or "
        "sqdf bbo --preset NAME for a BBO experiment) plus the model and weight paths it needs.",
    )
    pr.add_argument("name", nargs="?", metavar="NAME", help="show this preset in full")
    _add_build_commands(sub)
    _add_compare(sub)
    _add_bbo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="sqdf: %(message)s", level=logging.WARNING)
    args = build_parser().parse_args(argv)
    if launched()[0] > 0:  # one process speaks for all; errors still reach stderr
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    handler = {
        "train": _cmd_train,
        "eval": _cmd_eval,
        "report": _cmd_report,
        "sample": _cmd_sample,
        "demo": _cmd_demo,
        "pretrain": _cmd_pretrain,
        "compare": _cmd_compare,
        "distill-cm": _cmd_distill,
        "train-reward": _cmd_train_reward,
        "convert-aesthetic-head": _cmd_convert_head,
        "bbo": _cmd_bbo,
        "presets": _cmd_presets,
    }[args.command]
    # eval, report and sample write into the run folder: a full or read-only disk there is
    # one line, as it is for train, bbo and compare (which guard their own folders)
    run_folder = getattr(args, "run", None) if args.command in WRITES_TO_RUN else None
    clear_weights()  # each command records (and pins) only the weights it resolves itself
    try:
        with folder_writes(Path(run_folder)) if run_folder else contextlib.nullcontext():
            return handler(args)
    except Preempted as stop:  # a checkpoint is written; the line says how to go on
        if launched()[0] == 0:
            print(f"sqdf {args.command}: {stop}", file=sys.stderr)
        return stop.code
    except SqdfError as err:
        print(f"sqdf {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        bbo = args.command == "bbo" or getattr(args, "bbo", False)  # sqdf compare --bbo too
        again = "sqdf bbo --resume DIR" if bbo else "sqdf train --resume RUN"
        print(f"interrupted; resume from the latest checkpoint with {again}", file=sys.stderr)
        return 130


def run() -> NoReturn:
    """The ``sqdf`` command (and ``python -m sqdf.cli``): main(), then exit with its status."""
    code = main()
    if "RANK" in os.environ:  # under a launcher: leave without C++ teardown (see end_process)
        from sqdf.distributed import end_process

        end_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
