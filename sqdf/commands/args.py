"""What every command's arguments share: the parser (one-line errors, no abbreviations, no
empty values), KEY=VALUE items, the settings flags train, compare, bbo, eval and sample take,
and the default output folder."""

from __future__ import annotations

import argparse
import time
from typing import Any

from sqdf.config.train_config import tomllib
from sqdf.errors import SqdfError
from sqdf.infra.distributed import launched

DESCRIPTION = """\
Fine-tune diffusion models on a reward with SQDF (Soft Q-based Diffusion Fine-tuning):
a reparameterised policy gradient of a training-free soft Q-function, KL-regularised to
the pretrained model so samples stay natural and diverse."""


DICT_FIELDS = {"task_params": "--task-param", "reward_params": "--reward-param",
               "method_params": "--method-param"}  # fmt: skip


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # no abbreviations: --updates must not silently mean --updates-per-round
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        # every text value (one without a type of its own) must say something: an empty
        # --config or --task would otherwise read as not given
        text = action.type in (None, str) and not isinstance(action, argparse._SubParsersAction)
        if text and not arg_string.strip():
            raise argparse.ArgumentError(action, "expected a value, got an empty text")
        return super()._get_value(action, arg_string)

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
        if not sep or not key.strip():
            raise SqdfError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def key_and_values(text: str, flag: str, what: str) -> tuple[str, list[Any]]:
    """``KEY=V1,V2,...`` (or ``KEY=[V1, V2]``), each value read as TOML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or not raw:
        raise SqdfError(f"{flag} expects {what}=V1,V2,..., got {text!r}")
    values = _parse_value(raw) if raw.startswith("[") else [_parse_value(v) for v in raw.split(",")]
    return key.strip(), list(values)


SHORTHANDS = ("model", "prompts")  # flags for the sd task's most used parameters
PARAM_EXAMPLES = {"task_params": "radius=4.0", "reward_params": "'b=[1.0, 0.0]'",
                  "method_params": "k=2 (draft)"}  # fmt: skip


def add_setting_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    preset: bool = True,
    params: tuple[str, ...] = tuple(DICT_FIELDS),
    shorthands: tuple[str, ...] = SHORTHANDS,
) -> None:
    """--preset, --model, --prompts and the KEY=VALUE parameter flags, as every command that
    builds a task takes them (read back by ``setting_flags``)."""
    if preset:
        parser.add_argument(
            "--preset", metavar="NAME", default=None,
            help="a shipped configuration of a published run (sqdf presets lists them), "
            "under --config and the flags",
        )  # fmt: skip
    for key in params:
        parser.add_argument(
            DICT_FIELDS[key], dest=key, action="append", default=[], metavar="KEY=VALUE",
            help=f"{key[:-7]} parameter, e.g. {PARAM_EXAMPLES[key]} (repeatable)",
        )  # fmt: skip
    if "model" in shorthands:
        parser.add_argument(
            "--model", metavar="ID|PATH", default=None,
            help="sd: a diffusers pipeline of SD 1.x/2.x, SDXL, SD 3/3.5 or FLUX.1, as a Hub "
            "reference ([hf://]ORG/NAME[@REVISION]) or a local folder (= --task-param model=)",
        )  # fmt: skip
    if "prompts" in shorthands:
        parser.add_argument(
            "--prompts", metavar="SET|FILE", default=None,
            help="sd: prompts, a built-in set or a file (= --task-param prompts=)",
        )  # fmt: skip


def setting_flags(
    args: argparse.Namespace, shorthands: tuple[str, ...] = SHORTHANDS
) -> dict[str, Any]:
    """The parameter tables given by ``add_setting_flags``' flags: KEY=VALUE items, and
    --model/--prompts as the sd task's parameters of those names."""
    flags: dict[str, Any] = {}
    for key, flag in DICT_FIELDS.items():
        given = key_values(getattr(args, key, []), flag)
        if given:
            flags[key] = given
    for key in shorthands:
        if getattr(args, key, None):
            flags.setdefault("task_params", {})[key] = getattr(args, key)
    return flags


def add_gpu_memory_flag(parser: argparse.ArgumentParser) -> None:
    """--gpu-memory, which train's and bbo's --dry-run check the traced peak against."""
    parser.add_argument(
        "--gpu-memory", metavar="SIZE",
        help="with --dry-run: the card's memory to check the traced peak against, e.g. 24GiB "
        "(default: the detected GPU's, else no verdict)",
    )  # fmt: skip


def card_memory(args: argparse.Namespace) -> int | None:
    """The bytes a dry run checks its traced peak against: --gpu-memory's, else the detected
    GPU's (None without one, or without --dry-run). --gpu-memory without --dry-run is refused."""
    if args.gpu_memory is not None and not args.dry_run:
        raise SqdfError(f"--gpu-memory {args.gpu_memory} goes with --dry-run (a run's check)")
    if not args.dry_run:
        return None
    from sqdf.cost.memory import detected_gpu_memory, parse_memory

    return parse_memory(args.gpu_memory) if args.gpu_memory else detected_gpu_memory()


def default_out(name: str) -> str:
    if launched()[1] > 1:  # the processes' clocks may read different seconds
        raise SqdfError("give --out when launching several processes (they share one folder)")
    return f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
