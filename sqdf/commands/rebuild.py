"""The commands that rebuild the shipped digits assets, and the demo on them; and the
aesthetic head's conversion."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sqdf.errors import SqdfError
from sqdf.tasks import resolve_device


def _cmd_convert_head(args: argparse.Namespace) -> int:
    from sqdf.rewards.clip_rewards import convert_aesthetic_head

    print(f"wrote {convert_aesthetic_head(args.pth, args.out)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sqdf.experiments.demo import BASELINE, run_demo, summary_table

    t0 = time.perf_counter()
    overrides = {"steps": args.steps} if args.steps is not None else {}
    page = run_demo(
        args.out, num_samples=args.num_samples, progress=not args.no_progress,
        baseline=None if args.no_baseline else BASELINE, **overrides,
    )  # fmt: skip
    columns, rows = summary_table(page.parent)
    print(f"\n{'metric':<38}" + "".join(f"{c:>10}" for c in columns))
    for label, values in rows:
        cells = "".join(f"{v:>10.3f}" if v is not None else f"{'':>10}" for v in values)
        print(f"{label:<38}{cells}")
    picture = page.parent / "demo.png"
    shown = f"   picture: {picture}" if picture.is_file() else ""
    print(f"\nreport: {page}{shown}   ({time.perf_counter() - t0:.0f} s in all)")
    return 0


def _only_digits(task: str) -> None:
    if task != "digits":
        raise SqdfError(
            f"--task {task}: only 'digits' has shipped weights to rebuild "
            "(gmm2d's reference is exact)"
        )


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from sqdf.pretraining.pretrain import PretrainConfig, pretrain_digits

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
    from sqdf.pretraining.distill import DistillConfig, distill_cm

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


def _add_build_commands(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo",
        help="fine-tune the embedded digits model and write report.html",
        description="SQDF on the shipped digits model, ink reward, with the "
        "consistency-model Q, discount and prioritised replay, beside ReFL (a reward-gradient "
        "method without a KL term) from the same start, seed and number of updates; about "
        "3 minutes on 2 CPU cores. Prints a table with a column per method and writes "
        "RUN/report.html and RUN/demo.png (the baseline's run: RUN/baseline/).",
    )
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument(
        "--steps", type=int, default=None, help="optimizer updates per method (default: 50)"
    )
    d.add_argument("--num-samples", type=int, default=300, help="samples per model for metrics")
    d.add_argument("--no-baseline", action="store_true", help="SQDF alone, no baseline run")
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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_build_commands(sub)
    c = sub.add_parser(
        "convert-aesthetic-head",
        help="the public LAION aesthetic head (.pth) as safetensors, read with weights_only "
        "(runs need not: the aesthetic reward converts its head once, into sqdf's cache)",
    )
    c.add_argument("pth", metavar="IN.pth")
    c.add_argument("out", metavar="OUT.safetensors")


HANDLERS = {
    "demo": _cmd_demo,
    "pretrain": _cmd_pretrain,
    "distill-cm": _cmd_distill,
    "train-reward": _cmd_train_reward,
    "convert-aesthetic-head": _cmd_convert_head,
}
