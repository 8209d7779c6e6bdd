"""Drawn combinations of wrong flag values (hypothesis) for train, compare, eval and sample:
every combination stops with exit status 2 and one line on stderr, never a traceback, before
any sampling starts. Beside tests/test_flag_kinds.py, which enumerates one wrong value per
flag, this draws several flags at once and values of each wrong kind (empty, negative,
non-finite, wrong type, absent or unwritable paths, unknown names, missing). Derandomized:
CI draws the same examples every time, and a failure prints the command line."""

from __future__ import annotations

import argparse
import string
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqdf.cli import build_parser, main
from tests.test_flag_kinds import (
    OUTPUTS,
    REAL_KEYS,
    SIGNED_OK,
    TINY,
    Sampled,
    _base,
    _stop,
    _subparsers,
)

COMMANDS = ("train", "compare", "eval", "sample")
NAME = st.text(string.ascii_lowercase + "_", min_size=1, max_size=8).map(lambda s: "zz" + s)


def _flags(command: str) -> list[argparse.Action]:
    """The command's flags that take a value (a store_true one has no wrong value)."""
    parser = _subparsers(build_parser())[command]
    return [a for a in parser._actions if a.option_strings and a.nargs != 0
            and a.option_strings[0] not in ("-h", "--help", "--resume")]  # fmt: skip


def _wrong(action: argparse.Action, tmp: str) -> st.SearchStrategy[list[str]]:
    """A wrong value of the action's kind, as the flag's argv."""
    flag = action.option_strings[-1]
    absent = NAME.map(lambda n: [flag, f"{tmp}/absent/{n}"])
    if action.nargs == "?":  # an optional path: given, it must exist
        return absent
    empty = st.just([flag, ""])
    if action.choices is not None:
        known = set(map(str, action.choices))
        return st.one_of(empty, NAME.filter(lambda n: n not in known).map(lambda n: [flag, n]))
    if action.type in (int, float):
        kinds = [empty, st.sampled_from(["inf", "-inf", "nan"]).map(lambda v: [flag, v]),
                 NAME.map(lambda n: [flag, n])]  # fmt: skip
        if action.type is int:
            kinds.append(st.floats(0.1, 9.9).map(lambda v: [flag, f"{v:.2f}"]))
        if flag not in SIGNED_OK:
            kinds.append(st.integers(-1000, -1).map(lambda v: [flag, str(v)]))
        return st.one_of(kinds)
    if action.type is not None:  # a list type (query schedules)
        return st.one_of(empty, NAME.map(lambda n: [flag, f"{n},{n}"]),
                         st.integers(-99, -1).map(lambda v: [flag, str(v)]))  # fmt: skip
    if flag in OUTPUTS:
        places = st.sampled_from(["/proc/sqdf", "/etc/hostname"])
        return st.one_of(empty, st.tuples(places, NAME).map(lambda p: [flag, f"{p[0]}/{p[1]}"]))
    if isinstance(action, argparse._AppendAction) and action.metavar and "=" in action.metavar:
        real = REAL_KEYS.get(flag, "nope_key=inf").partition("=")[0]
        non_finite = st.sampled_from(["inf", "-inf", "nan"]).map(
            lambda v: [flag, f"{real}=[{v}, 0.0]" if real == "b" else f"{real}={v}"]
        )
        wrong_type = NAME.map(lambda n: [flag, f"{real}=[{n!r}, 0.0]" if real == "b"
                                         else f"{real}={{a = {n!r}}}"])  # fmt: skip
        return st.one_of(empty, non_finite, wrong_type, NAME.map(lambda n: [flag, f"{n}=1"]),
                         NAME.map(lambda n: [flag, n]), st.just([flag, "=1"]))  # fmt: skip
    return st.one_of(empty, NAME.map(lambda n: [flag, n]), absent)


@st.composite
def wrong_command_lines(draw: st.DrawFn, tmp: str) -> tuple[str, list[str]]:
    """A command, one to three of its flags with wrong values, maybe the last missing its
    value."""
    command = draw(st.sampled_from(COMMANDS))
    # mostly one flag: a second wrong one is often refused first (argparse's are), which
    # would hide whether the first was checked at all
    size = draw(st.sampled_from([1, 1, 1, 2, 3]))
    actions = draw(st.lists(st.sampled_from(_flags(command)), min_size=size, max_size=size,
                            unique_by=lambda a: a.dest))  # fmt: skip
    argv = [arg for action in actions for arg in draw(_wrong(action, tmp))]
    if draw(st.integers(0, 5)) == 0:  # the last flag given without its value
        argv.append(actions[-1].option_strings[-1])
    return command, argv


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("flag_kinds_drawn") / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    return str(run)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("flag_kinds_drawn_tmp")


def test_drawn_wrong_flag_combinations_are_one_line(finished_run, workdir, monkeypatch):
    for name, module in list(sys.modules.items()):
        if name.startswith("sqdf") and hasattr(module, "sample_trajectories"):
            monkeypatch.setattr(module, "sample_trajectories", _stop)
    monkeypatch.chdir(workdir)

    @settings(max_examples=150, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(wrong_command_lines(str(workdir)))
    def check(case: tuple[str, list[str]]) -> None:
        command, argv = case
        line = [*_base(command, finished_run, str(workdir)), *argv]
        err = _run(line)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (line, err)

    check()


def _run(argv: list[str]) -> str:
    """sqdf ARGV's stderr, asserting exit status 2 (the line is named on failure)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        except Sampled:
            pytest.fail(f"sqdf {' '.join(argv)}: the wrong values were taken")
    text = err.getvalue().strip()
    assert code == 2, (argv, text)
    return text
