"""sqdf train and sqdf presets."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from sqdf.commands.args import (
    DESCRIPTION,
    DICT_FIELDS,
    add_gpu_memory_flag,
    add_setting_flags,
    card_memory,
    default_out,
    setting_flags,
)
from sqdf.config.train_config import config_fields, read_toml
from sqdf.errors import SqdfError
from sqdf.infra.distributed import launched
from sqdf.run.settings import Resolved, config_sources, make_config, resolve_settings

TRAIN_EPILOG = """\
examples:
  sqdf train --task gmm2d --steps 300 --out runs/gmm2d
  sqdf train --config my.toml --alpha 1.0 --reward-param 'b=[0.0, 1.0]'
  sqdf train --resume runs/gmm2d --steps 600      # continue (and extend) a run
  sqdf train --preset sd15-aesthetic --out runs/sd      # its weights fetched from the Hub
  sqdf train --preset sd15-aesthetic --dry-run          # what would run and be downloaded
  sqdf train --preset sdxl-aesthetic --out runs/sdxl    # (also sd35m-, flux-dev-, flux-schnell-)
  sqdf train --task sd --model stabilityai/stable-diffusion-xl-base-1.0 \
      --task-param lcm=latent-consistency/lcm-lora-sdxl/pytorch_lora_weights.safetensors \
      --task-param resolution=512 --out runs/sdxl-512

Every weight (--model, lcm, a reward's clip/head/model/checkpoint) is a Hub reference,
[hf://]ORG/NAME[@REVISION][/FILE], fetched into the Hugging Face cache on first use, or a
local path (docs/weights.md). The sd task reads the family from the pipeline's
model_index.json: StableDiffusionPipeline (SD 1.x/2.x), StableDiffusionXLPipeline (SDXL),
StableDiffusion3Pipeline (SD 3/3.5) or FluxPipeline (FLUX.1).

settings: built-in defaults < the task's defaults < --preset < --config < flags. The sd
task's defaults are the official SQDF aesthetic run's (batch 4 x 8 accumulation per process,
alpha 2.0 in the reference code's per-dimension convention, 2,000 updates); digits' are the
demo's. --dry-run shows every value and where it came from.

task parameters (--task-param KEY=VALUE; README for their meaning):
  gmm2d   num_modes, radius, std, means, stds, weights, hidden, ode_steps, process,
          noise_level, noise_level_end, shift
  digits  model, cm, guidance, lora_rank, lora_alpha, lora_targets, classes, finetune,
          compile, channels_last
  sd      model, prompts, eval_prompts, negative_prompt, guidance, true_cfg,
          cfg_detach_uncond, resolution, lora_rank, lora_alpha, lora_targets, lora_init,
          reference_compat, lcm_timesteps, tf32, lcm, lcm_guidance, dtype,
          gradient_checkpointing, vae_slicing, finetune, quantize_base, compile,
          channels_last, noise_level, noise_level_end

A TOML config holds the same keys as the flags (underscores), with [task_params] and
[reward_params] tables. Flags override the file. The resolved configuration is written to
RUN/config.json."""


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
        "--dry-run", action="store_true",
        help="print every resolved setting and where it came from, the model's D, alpha in "
        "both conventions, the effective batch and the replay buffer's memory, and the FLOPs "
        "and traced GPU memory of one update; train nothing",
    )  # fmt: skip
    add_gpu_memory_flag(p)
    p.add_argument("--out", metavar="RUN", help="run folder (default: runs/TASK-METHOD-TIME)")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_setting_flags(p)
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


def _train_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The config values given as flags: plain keys, KEY=VALUE parameters, --model/--prompts."""
    flags = {f.name: getattr(args, f.name) for f in config_fields() if hasattr(args, f.name)}
    flags = {k: v for k, v in flags.items() if v is not None and k not in DICT_FIELDS}
    return {**flags, **setting_flags(args)}


def _resumed_settings(args: argparse.Namespace, flags: dict[str, Any]) -> Resolved:
    """A run's own config with the flags that may change on resume (e.g. --steps) over it."""
    from sqdf.run.folder import config_path, read_run_config

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


def not_a_bbo_preset(name: str | None, what_to_do: str) -> None:
    from sqdf.run.settings import load_preset

    if name and load_preset(name).is_bbo:
        raise SqdfError(f"preset {name!r} is an online BBO experiment: {what_to_do}")


def _cmd_train(args: argparse.Namespace) -> int:
    from sqdf.training.trainer import train

    flags = _train_flags(args)
    if args.resume:
        resolved = _resumed_settings(args, flags)
    else:
        not_a_bbo_preset(args.preset, "run it with sqdf bbo --preset")
        resolved = resolve_settings(
            flags=flags,
            config_file=read_toml(args.config) if args.config else None,
            config_name=args.config or "--config",
            preset=args.preset,
        )
        if resolved.bbo:
            raise SqdfError(f"{args.config}: a [bbo] table is for sqdf bbo, not sqdf train")
    memory = card_memory(args)
    if args.dry_run:
        from sqdf.training.dry_run import dry_run_text

        print(dry_run_text(resolved, processes=max(launched()[1], 1), gpu_memory=memory))
        return 0
    cfg = resolved.config()
    out = args.resume or args.out or default_out(f"{cfg.task}-{cfg.method}")
    run = train(
        cfg, out, resume=bool(args.resume), progress=not args.no_progress,
        sources=resolved.sources, command=shlex.join(["sqdf", *args.argv]),
    )  # fmt: skip
    print(f"run folder: {run}\nnext: sqdf eval {run}   (or: sqdf sample {run})")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from sqdf.run.settings import load_preset, preset_names

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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_train(sub)
    pr = sub.add_parser(
        "presets",
        help="list the shipped presets (the settings of published runs), or show one",
        description="Presets are TOML files shipped in sqdf/presets/: the settings of a "
        "published run, over the task's defaults. Use one with sqdf train --preset NAME (or "
        "sqdf bbo --preset NAME for a BBO experiment) plus the model and weight paths it needs.",
    )
    pr.add_argument("name", nargs="?", metavar="NAME", help="show this preset in full")


HANDLERS = {"train": _cmd_train, "presets": _cmd_presets}
