"""The commands that read a finished run: sqdf eval, sample, report and push."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sqdf.commands.args import add_setting_flags, key_values, setting_flags
from sqdf.errors import SqdfError
from sqdf.evaluation.evaluate import EVAL_SEED
from sqdf.run.settings import BUILT_IN, resolve_settings

SAMPLE_EPILOG = """\
examples:
  sqdf sample runs/gmm2d --num-samples 2048
  sqdf sample runs/sd --num-samples 8
  sqdf sample --task sd --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --lora runs/sd/final --prompts animals --out grid.png"""


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
    from sqdf.evaluation.evaluate import evaluate_run

    own, cross = [], []  # the run's own reward's parameters, and a --rewards reward's
    dotted = any("." in item.partition("=")[0] for item in args.reward_param)
    parts = _mixture_parts(args.run) if dotted else ()
    for item in args.reward_param:
        key = item.partition("=")[0]
        # NAME.KEY is the run's own mixture part NAME's (as train spells it), else a --rewards'
        ours = "." not in key or any(key.startswith(name + ".") for name in parts)
        (own if ours else cross).append(item)
    overrides = setting_flags(args, shorthands=("model",))
    if own:
        overrides["reward_params"] = key_values(own, "--reward-param")
    metrics = evaluate_run(
        args.run,
        num_samples=args.num_samples,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        rewards=reward_choices(args.rewards, cross),
        prompts=args.prompts,
        per_prompt=args.per_prompt,
        clip=args.clip,
        lpips=args.lpips,
        dreamsim=args.dreamsim,
        dreamsim_type=args.dreamsim_type,
        fid=args.fid,
        overrides=overrides or None,
    )
    print(json.dumps({k: v for k, v in metrics.items() if k != "per_prompt"}, indent=1))
    written = ["eval.json", "eval.md"] if "per_prompt" in metrics else ["eval.json"]
    print("wrote " + ", ".join(str(Path(args.run) / name) for name in written))
    if overrides:
        from sqdf.evaluation.heldout import describe_overrides

        print("note: " + describe_overrides(overrides))
    return 0


def _mixture_parts(run: str) -> tuple[str, ...]:
    """The component names of a run's reward mixture (none for a single reward)."""
    from sqdf.rewards.mixture import parse_mixture
    from sqdf.run.folder import read_run_config

    return tuple(parse_mixture(read_run_config(run).reward) or ())


def _cmd_sample(args: argparse.Namespace) -> int:
    from sqdf.evaluation.evaluate import sample_run

    if args.task == "sd" or (args.preset and not args.run):
        from sqdf.evaluation.render import render_sd

        model, prompts, guidance, num_steps = _render_settings(args)
        picture = render_sd(
            model, args.lora, prompts, args.out or "sd_samples.png",
            num_images=8 if args.num_samples is None else args.num_samples, seed=args.seed,
            guidance=guidance, num_steps=num_steps, device=args.device,
        )  # fmt: skip
        print(f"wrote {picture}")
        return 0
    if not args.run:
        raise SqdfError("give a run folder (or --task sd --model PATH --lora RUN/final)")
    if args.preset:
        raise SqdfError("a run folder carries its own settings: give --preset without RUN")
    if args.reward_params:  # sampling scores nothing: a reward's parameter changes no sample
        raise SqdfError(
            "--reward-param: sqdf sample draws samples without scoring them (score them with "
            "sqdf eval RUN --reward-param)"
        )
    sd_only = {"--lora": args.lora, "--guidance": args.guidance, "--num-steps": args.num_steps,
               "--device": None if args.device == "auto" else args.device}  # fmt: skip
    for flag, value in sd_only.items():
        if value is not None:
            raise SqdfError(f"{flag} is for sqdf sample --task sd; {args.run} is sampled as run")
    picture = sample_run(
        args.run,
        num_samples=1024 if args.num_samples is None else args.num_samples,
        seed=args.seed,
        out=args.out,
        with_reference=not args.no_reference,
        overrides=setting_flags(args) or None,
    )
    print(f"wrote {picture} and {picture.with_suffix('.safetensors')}")
    return 0


# the sd task's parameters a render takes (model, prompts, guidance; --num-steps is a flag):
# any other was given for a training run and would be dropped without a word
RENDER_PARAMS = ("model", "prompts", "guidance")


def _render_settings(args: argparse.Namespace) -> tuple[str, str | None, float | None, int | None]:
    """The model, prompts, guidance and steps sqdf sample --task sd renders with: the flags
    over --preset's (the rest of the render's settings are the --lora run's, or its defaults).
    A parameter the render does not take is refused, not dropped."""
    if args.run:
        raise SqdfError("give a run folder or --task sd / --preset, not both")
    if args.reward_params:
        raise SqdfError("--reward-param: sqdf sample --task sd renders without a reward")
    flags = setting_flags(args)
    ignored = [key for key in flags.get("task_params", {}) if key not in RENDER_PARAMS]
    if ignored:
        raise SqdfError(
            f"--task-param {ignored[0]}: sqdf sample --task sd renders with "
            f"{', '.join(RENDER_PARAMS)} and --num-steps only (the rest are the --lora run's)"
        )
    if args.guidance is not None and "guidance" in flags.get("task_params", {}):
        raise SqdfError("give --guidance or --task-param guidance, not both")
    resolved = resolve_settings(flags={"task": "sd", **flags}, preset=args.preset, needs=False)
    resolved.config()  # unknown keys and non-finite values, in one line
    params = resolved.values.get("task_params", {})
    model = params.get("model")
    if not model:
        raise SqdfError(
            "sqdf sample --task sd needs --model PATH or a Hub reference (an SD 1.x/2.x, SDXL, "
            "SD 3/3.5 or FLUX.1 pipeline)"
        )

    def given(key: str) -> Any:
        # the task's defaults would hide the --lora run's own: only values given count
        source = resolved.source_of(key)
        if source == BUILT_IN or source.startswith("task defaults"):
            return None
        table, _, name = key.rpartition(".")
        return (params if table else resolved.values).get(name)

    guidance = args.guidance if args.guidance is not None else given("task_params.guidance")
    num_steps = args.num_steps if args.num_steps is not None else given("num_steps")
    return str(model), given("task_params.prompts"), guidance, num_steps


def _cmd_push(args: argparse.Namespace) -> int:
    from sqdf.run.push import push_run

    url = push_run(args.run, args.repo_id, private=True if args.private else None)
    print(f"pushed {Path(args.run) / 'final'} to {args.repo_id}: {url}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from sqdf.evaluation.run_report import write_run_report

    page = write_run_report(args.run, device=args.device, progress=not args.no_progress)
    print(f"wrote {page}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
        "--reward-param", action="append", default=[], metavar="[NAME.]KEY=VALUE",
        help="a parameter of a --rewards reward, e.g. pickscore.model=yuvalkirstain/PickScore_v1 "
        "(a Hub reference or a local path), or without NAME. of the run's own reward (over its "
        "config.json), e.g. clip=openai/clip-vit-large-patch14 (repeatable)",
    )  # fmt: skip
    add_setting_flags(e, preset=False, params=("task_params",), shorthands=("model",))
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
        "--clip", default=None, metavar="ID|FOLDER",
        help="sd: CLIP model (a Hub reference or a local folder) for diversity and Fréchet "
        "features (default: the CLIP of the first reward that has one, else 32x32 pixels)",
    )  # fmt: skip
    e.add_argument(
        "--lpips", nargs="?", const=True, default=None, metavar="FILE",
        help="sd: LPIPS diversity (lpips package, AlexNet v0.1); without FILE torchvision "
        "fetches its AlexNet into the torch hub cache; FILE (a local path or a Hub reference): "
        "torchvision's alexnet-owt-7be5be79.pth or a safetensors file of its features.*",
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
    add_setting_flags(s, params=("task_params", "reward_params"))
    s.add_argument(
        "--lora",
        metavar="DIR",
        help="sd: the RUN/final folder of an sd run (its LoRA, or its fully fine-tuned unet/)",
    )
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
    pu = sub.add_parser(
        "push",
        help="upload a finished run's final/ (weights and model card) to the Hugging Face Hub",
        description="Uploads RUN/final with huggingface_hub (the same as hf upload REPO_ID "
        "RUN/final .), making the model repository if it does not exist. Log in first with "
        "hf auth login, or set HF_TOKEN.",
    )  # fmt: skip
    pu.add_argument("run", metavar="RUN", help="run folder written by sqdf train")
    pu.add_argument("repo_id", metavar="REPO_ID", help="the model repository, e.g. user/name")
    pu.add_argument("--private", action="store_true", help="make a new repository private")


HANDLERS = {"eval": _cmd_eval, "sample": _cmd_sample, "report": _cmd_report, "push": _cmd_push}
