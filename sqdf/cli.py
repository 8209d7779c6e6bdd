"""Command line: the ``sqdf`` parser assembled from sqdf.commands (one module per group of
commands) and ``main``, which turns a user's error into one line and exit status 2."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from sqdf.commands import experiments, rebuild, runs, train
from sqdf.commands.args import DESCRIPTION, Parser
from sqdf.errors import SqdfError
from sqdf.infra.atomic import folder_writes
from sqdf.infra.distributed import launched
from sqdf.infra.preemption import Preempted
from sqdf.infra.weights import clear as clear_weights

COMMANDS = (train, runs, experiments, rebuild)  # each: add_parsers(sub) and HANDLERS
WRITES_TO_RUN = ("eval", "report", "sample")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sqdf", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="sqdf: %(message)s", level=logging.WARNING)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line, for a run's model card
    if launched()[0] > 0:  # one process speaks for all; errors still reach stderr
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    handlers = {name: f for command in COMMANDS for name, f in command.HANDLERS.items()}
    handler = handlers[args.command]
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
        from sqdf.infra.distributed import end_process

        end_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
