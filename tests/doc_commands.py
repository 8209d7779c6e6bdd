"""The shell commands written in Markdown documents (the README, the documentation site's
pages), as the tests run them: the code blocks of one language, each command split as a shell
would split it, and `sqdf` commands called in-process with flags appended that shrink them to
seconds (later flags win, so the command itself stays as written).

A block that needs more than that (weights laid out under its names, a check of what it
printed) is run by a test of its own, named in a comment on the line above the block,
``<!-- run by tests/test_x.py -->``, and read there with :func:`doc_block`; the tests that run
every block of a page leave those out."""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest

import sqdf.experiments.demo
from sqdf.cli import main
from sqdf.config.train_config import tomllib

ROOT = Path(__file__).resolve().parents[1]

# sqdf's own names for itself in the docs: the installed script, the one setup.sh puts in .venv
SQDF = ("sqdf", ".venv/bin/sqdf")

# appended to each subcommand: a few updates of a few sampling steps, few evaluation samples
QUICK = {
    "train": ["--num-steps", "4", "--steps", "2", "--batch-size", "4", "--buffer-size", "8",
              "--grad-accum", "1", "--lr-warmup", "0", "--no-progress"],
    "eval": ["--num-samples", "64", "--no-progress"],
    "report": ["--no-progress"],
    "demo": ["--steps", "2", "--num-samples", "16", "--no-progress"],
    "bbo": ["--set", "num_steps=4", "--set", "batch_size=8", "--set", "buffer_size=16",
            "--rounds", "2", "--queries-per-round", "8", "--updates-per-round", "2",
            "--seeds", "1", "--no-progress"],
    "compare": ["--set", "num_steps=4", "--steps", "2", "--set", "batch_size=8",
                "--set", "buffer_size=16", "--num-samples", "64", "--seeds", "1", "--no-progress"],
    "presets": [],
}  # fmt: skip
# sqdf demo has no flags for its sampling steps and batch: its library call gets them, as
# tests/test_demo.py gives them
DEMO_QUICK = {"quality_samples": 8, "num_steps": 4, "batch_size": 4, "buffer_size": 8,
              "checkpoint_every": 0}  # fmt: skip


def code_blocks(text: str, lang: str) -> list[str]:
    """The fenced code blocks of language ``lang`` in Markdown ``text``, in order."""
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


RUN_BY = re.compile(r"^<!-- run by (tests/\S+\.py) -->\n```(\w+)\n(.*?)```", flags=re.S | re.M)


def run_by(text: str) -> list[tuple[str, str, str]]:
    """(test file, language, block) of each block of Markdown ``text`` that a test of its own
    runs, as the comment above the block names it."""
    return RUN_BY.findall(text)


def doc_block(page: str, marker: str, lang: str = "bash") -> str:
    """The one block of language ``lang`` that contains ``marker`` on ``page`` (a path from the
    repository root: ``README.md``, ``docs/guides/sdxl.md``), which its test runs."""
    text = (ROOT / page).read_text()
    (block,) = [b for b in code_blocks(text, lang) if marker in b]
    assert block in [b for _, _, b in run_by(text)], f"{page}: say which test runs {marker!r}"
    return block


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
            sqdf.experiments.demo,
            "run_demo",
            functools.partial(sqdf.experiments.demo.run_demo, **DEMO_QUICK),
        )
    return main(quick(args))


def check_installer(argv: list[str], where: str) -> None:
    """An install or build command of the docs, checked against the repository: setup.sh's
    flags, pip's extras, the site's build."""
    if argv[:2] == ["bash", "scripts/setup.sh"]:
        assert set(argv[2:]) <= {"--browser"}, f"{where}: setup.sh takes --browser only"
        return
    if argv[:3] == ["pip", "install", "-e"]:
        extras = re.fullmatch(r"\.\[([\w,-]+)\]", argv[3])
        assert extras, f"{where}: {argv}"
        declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        for extra in extras.group(1).split(","):
            assert extra in declared["optional-dependencies"], f"{where}: no extra {extra!r}"
        return
    if argv[:3] == [".venv/bin/python", "-m", "sphinx"]:  # the site's build: test_docs_site's
        assert {"-W", "html", "docs", "docs/_build/html"} <= set(argv), where
        assert "docs/_build/" in (ROOT / ".gitignore").read_text().splitlines(), where
        return
    pytest.fail(f"{where}: a command the tests do not know how to check: {' '.join(argv)}")
