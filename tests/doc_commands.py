"""The shell commands written in Markdown documents (the README, the documentation site's
pages), as the tests run them: the code blocks of one language, each command split as a shell
would split it, and `sqdf` commands called in-process with flags appended that shrink them to
seconds (later flags win, so the command itself stays as written)."""

from __future__ import annotations

import functools
import re
import shlex

import pytest

import sqdf.demo
from sqdf.cli import main

# sqdf's own names for itself in the docs: the installed script, the one setup.sh puts in .venv
SQDF = ("sqdf", ".venv/bin/sqdf")

# appended to each subcommand: a few updates of a few sampling steps, few evaluation samples
QUICK = {
    "train": ["--num-steps", "4", "--steps", "2", "--batch-size", "4", "--buffer-size", "8",
              "--grad-accum", "1", "--no-progress"],
    "eval": ["--num-samples", "64", "--no-progress"],
    "report": ["--no-progress"],
    "demo": ["--steps", "2", "--num-samples", "16", "--no-progress"],
    "bbo": ["--set", "num_steps=4", "--set", "batch_size=8", "--set", "buffer_size=16",
            "--rounds", "2", "--queries-per-round", "8", "--updates-per-round", "2",
            "--seeds", "1", "--no-progress"],
    "presets": [],
}  # fmt: skip
# sqdf demo has no flags for its sampling steps and batch: its library call gets them, as
# tests/test_demo.py gives them
DEMO_QUICK = {"quality_samples": 8, "num_steps": 4, "batch_size": 4, "buffer_size": 8,
              "checkpoint_every": 0}  # fmt: skip


def code_blocks(text: str, lang: str) -> list[str]:
    """The fenced code blocks of language ``lang`` in Markdown ``text``, in order."""
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def command_lines(block: str) -> list[list[str]]:
    """The commands of a shell block, each split as a shell would: continued lines joined,
    comments and blank lines left out."""
    text = block.replace("\\\n", " ")
    return [argv for line in text.splitlines() if (argv := shlex.split(line, comments=True))]


def quick(args: list[str]) -> list[str]:
    """sqdf arguments (after the program name) with the shrinking flags of their subcommand."""
    return [*args, *QUICK[args[0]]]


def run_sqdf(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run ``sqdf ARGS`` in this process, shrunk; its exit status."""
    if args[0] == "demo":
        monkeypatch.setattr(
            sqdf.demo, "run_demo", functools.partial(sqdf.demo.run_demo, **DEMO_QUICK)
        )
    return main(quick(args))
