"""Every flag of every command, given a value of every wrong kind, stops with exit status 2 and
one line on stderr, never a traceback, before any sampling starts.

The flags are read from the parser itself (a new flag is driven without editing this file);
each flag gets the wrong values of its kind: missing, empty, not a number, fractional,
negative, non-finite, unknown names, malformed or unknown KEY=VALUE items, absent files and
folders that cannot be made. Every case is enumerated (no random draw), so a failure names
the command line that gave it and CI reruns exactly the same cases. A value that a flag
legitimately accepts must reach sampling, where a stand-in stops the run: a wrong value that
gets that far was not refused, and the case fails."""

from __future__ import annotations

import argparse
import sys

import pytest

from sqdf.cli import build_parser, main

TINY = ["--num-steps", "3", "--steps", "1", "--batch-size", "2", "--buffer-size", "4",
        "--device", "cpu", "--no-progress"]  # fmt: skip
COMMANDS = ("train", "compare", "bbo", "eval", "sample", "report", "presets", "push")
# the rebuild commands (demo, pretrain, distill-cm, train-reward, convert-aesthetic-head)
# train for minutes once their input is good, so they are left to tests/test_rebuild.py

# flags for which a negative or zero number is a legitimate value (a random seed)
SIGNED_OK = {"--seed"}
# flags whose value is a place to write (any name is legitimate there, but not one that
# cannot be made)
OUTPUTS = {"--out"}
# flags that take a free text where any word is legitimate
FREE_TEXT: set[str] = set()
# a non-finite value of a key each KEY=VALUE flag knows on the commands' gmm2d runs (linear
# reward, sqdf method)
REAL_KEYS = {"--task-param": "std=inf", "--reward-param": "b=[inf, 0.0]",
             "--method-param": "q_at=inf", "--set": "alpha=inf"}  # fmt: skip
# flags whose wrong values are checked only on an sd run (on a gmm2d run they stop earlier,
# at "unknown parameter 'model'"): eval and sample take them on a tiny random SD run
SD_FLAGS = {("eval", "--model"), ("sample", "--model")}


class Sampled(Exception):
    """Raised by the stand-in sampler: the command got past its checks."""


def _stop(*args, **kwargs):
    raise Sampled


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("sqdf has subcommands")


def _wrong_values(action: argparse.Action, tmp: str) -> list[tuple[str, list[str]]]:
    """(kind, the flag's argv) for every wrong value of the action's kind."""
    flag = action.option_strings[-1]
    if action.nargs == 0:  # store_true: no value to get wrong, but it takes none
        return [("a value", [f"{flag}=1"])]
    out: list[tuple[str, list[str]]] = [("missing", [flag])]
    if action.choices is not None:
        return out + [("unknown choice", [flag, "nope"]), ("empty", [flag, ""])]
    if action.type in (int, float):
        out += [("empty", [flag, ""]), ("not a number", [flag, "x"]),
                ("non-finite", [flag, "inf"]), ("NaN", [flag, "nan"])]  # fmt: skip
        if action.type is int:
            out.append(("fractional", [flag, "1.5"]))
        if flag not in SIGNED_OK:
            out.append(("negative", [flag, "-3"]))
        return out
    if action.type is not None:  # a list type (query schedules)
        return out + [("empty", [flag, ""]), ("not numbers", [flag, "a,b"]),
                      ("negative", [flag, "-3"])]  # fmt: skip
    if action.nargs == "?":  # a flag with an optional path: given, the path must exist
        return [("absent path", [flag, f"{tmp}/absent/file"])]
    if action.option_strings[0] in OUTPUTS:
        return [("missing", [flag]), ("empty", [flag, ""]),
                ("unwritable", [flag, "/proc/sqdf/x"]),
                ("under a file", [flag, "/etc/hostname/x"])]  # fmt: skip
    if isinstance(action, argparse._AppendAction) and action.metavar and "=" in action.metavar:
        # a key the flag knows, so that the non-finite value meets the finiteness check and
        # not the unknown-key one (a user's oracle's parameters are its own: any key)
        real = REAL_KEYS.get(flag, "nope_key=inf")
        return out + [("empty", [flag, ""]), ("no value", [flag, "key"]),
                      ("no key", [flag, "=1"]), ("unknown key", [flag, "nope_key=1"]),
                      ("non-finite", [flag, real])]  # fmt: skip
    if action.option_strings[0] in FREE_TEXT:
        return out
    return out + [("empty", [flag, ""]), ("unknown name", [flag, "nope"]),
                  ("absent path", [flag, f"{tmp}/absent/nope"])]  # fmt: skip


def _base(command: str, run: str, tmp: str) -> list[str]:
    """A command line that is good as it is, except for the flag under test."""
    return {
        "train": ["train", "--out", f"{tmp}/t", *TINY],
        "compare": ["compare", "--out", f"{tmp}/c", "--seeds", "1", "--methods", "sqdf",
                    "--no-progress", "--steps", "1", "--set", "num_steps=3",
                    "--set", "batch_size=2", "--set", "buffer_size=4", "--set", "device='cpu'"],
        "bbo": ["bbo", "--out", f"{tmp}/b", "--seeds", "1", "--methods", "sqdf",
                "--no-progress", "--rounds", "1", "--queries-per-round", "4"],
        "eval": ["eval", run, "--no-progress"],
        "sample": ["sample", run, "--out", f"{tmp}/s.png"],
        "report": ["report", run, "--no-progress"],
        "presets": ["presets"],
        "push": ["push", run, "me/x"],
    }[command]  # fmt: skip


def _cases() -> list[tuple[str, str, str, list[str]]]:
    parsers = _subparsers(build_parser())
    cases = []
    for command in COMMANDS:
        for action in parsers[command]._actions:
            if not action.option_strings or action.option_strings[0] in ("-h", "--help"):
                continue
            if action.dest in ("resume", "dry_run"):  # other modes, driven below
                continue
            for kind, argv in _wrong_values(action, "TMP"):
                cases.append((command, action.option_strings[-1], kind, argv))
    return cases


CASES = _cases()
# wrong values of the other modes and the positional arguments: whole command lines (RUN is a
# finished run)
CASES += [
    ("train", "--resume", "absent", ["train", "--resume", "TMP/absent"]),
    ("compare", "--resume", "absent", ["compare", "--resume", "TMP/absent"]),
    ("bbo", "--resume", "absent", ["bbo", "--resume", "TMP/absent"]),
    ("eval", "RUN", "absent", ["eval", "TMP/absent"]),
    ("eval", "RUN", "empty", ["eval", ""]),
    ("sample", "RUN", "not a run", ["sample", "TMP"]),
    ("report", "RUN", "absent", ["report", "TMP/absent"]),
    ("presets", "NAME", "unknown name", ["presets", "nope"]),
    ("push", "RUN", "absent", ["push", "TMP/absent", "me/x"]),
    ("push", "REPO_ID", "empty", ["push", "RUN", ""]),
    ("push", "REPO_ID", "not a repository id", ["push", "RUN", "a b/c d"]),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("flag_kinds") / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    return str(run)


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    """A finished sd run on tiny random SD parts (one update, Tweedie's x̂0: no consistency
    model to write)."""
    from sqdf.tasks.sd_random import write_random_sd

    root = tmp_path_factory.mktemp("flag_kinds_sd")
    model = write_random_sd(root / "model")
    argv = ["train", "--task", "sd", "--reward", "ink", "--model", str(model), "--estimator",
            "tweedie", "--prompts", "varied", "--out", str(root / "run"), "--num-steps", "2",
            "--steps", "1", "--batch-size", "2", "--buffer-size", "4", "--device", "cpu",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return str(root / "run")


@pytest.mark.parametrize(
    "command,flag,argv",
    [(c[0], c[1], c[3]) for c in CASES],
    ids=[f"{c[0]} {c[1]} {c[2]}" for c in CASES],
)
def test_a_wrong_value_of_any_flag_is_one_line(
    command, flag, argv, request, tmp_path, monkeypatch, capsys
):
    sd = (command, flag) in SD_FLAGS
    finished_run = request.getfixturevalue("sd_run" if sd else "finished_run")
    for name, module in list(sys.modules.items()):
        if name.startswith("sqdf") and hasattr(module, "sample_trajectories"):
            monkeypatch.setattr(module, "sample_trajectories", _stop)
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("TMP", str(tmp_path)).replace("RUN", finished_run) for a in argv]
    base = [] if argv[0] == command else _base(command, finished_run, str(tmp_path))
    capsys.readouterr()
    try:
        code = main([*base, *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    except Sampled:
        pytest.fail(f"sqdf {' '.join([*base, *argv])}: the wrong value was taken")
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
