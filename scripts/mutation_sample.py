"""The sampling half of scripts/mutation.sh: list mutmut's mutants, draw a uniform random
sample of them per part, and score what a run of the sample reached, with a Wilson interval.
Run from mutmut's work folder (where setup.cfg and mutants/ are); the script calls it.

    python mutation_sample.py generate                  # write mutants/ as `mutmut run` does
    python mutation_sample.py draw N SEED PART... [--skip FILE]   # N names per part, printed
    python mutation_sample.py score [--batches FILE... --parts] PART...  # per part: the score

A PART is a path prefix of the mutated files (``sqdf/core``, ``sqdf/training/update.py``) or
several joined by commas (``sqdf/training/gradients.py,sqdf/training/update.py``: one part);
a mutant belongs to the first part whose prefix its file has. ``draw`` leaves out mutants that
already have a verdict and the names listed in FILE (e.g. those an earlier run reached), so a
sample estimates the score of what is not yet checked. ``score`` counts every mutant with a
verdict, or only those the sampled batches (FILEs of names) drew, a part's share of a batch
only where all of it ran.

mutmut 3.8.1 has no command that only generates its mutants (``mutmut run`` goes on to collect
per-test statistics, minutes of tests), so ``generate`` calls the functions ``mutmut run``
starts with; the version is pinned in scripts/mutation.sh.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from typing import NoReturn

Z95 = 1.959963984540054


def wilson(killed: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a proportion killed/n (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = killed / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def verdicts() -> dict[str, tuple[str, int | None]]:
    """Every mutant of mutants/: name -> (its source file, mutmut's exit code or None)."""
    out: dict[str, tuple[str, int | None]] = {}
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        source = str(meta.relative_to("mutants"))[: -len(".meta")]
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            out[name] = (source, code)
    return out


def part_of(source: str, parts: list[str]) -> str | None:
    """The part a mutated file belongs to; a part is a path or comma-joined paths."""

    def within(prefix: str) -> bool:
        return source == prefix or source.startswith(prefix.rstrip("/") + "/")

    return next((p for p in parts if any(within(prefix) for prefix in p.split(","))), None)


def generate() -> None:
    from mutmut.__main__ import create_mutants
    from mutmut.mutation.trampoline import set_mutant_under_test
    from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, setup_source_paths

    set_mutant_under_test("mutant_generation")
    Path("mutants").mkdir(exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    setup_source_paths()
    create_mutants(1)


def draw(n: int, seed: int, parts: list[str], skip: set[str]) -> list[str]:
    rng = random.Random(seed)
    by_part: dict[str, list[str]] = {p: [] for p in parts}
    for name, (source, code) in verdicts().items():
        part = part_of(source, parts)
        if part is not None and code is None and name not in skip:
            by_part[part].append(name)
    picked: list[str] = []
    for part in parts:
        population = sorted(by_part[part])
        print(
            f"{part}: {len(population)} mutants without a verdict, drawing "
            f"{min(n, len(population))}",
            file=sys.stderr,
        )
        picked += rng.sample(population, min(n, len(population)))
    return picked


def score(parts: list[str], batches: list[set[str]] | None) -> None:
    """Per part: the population, then the verdicts counted, score and (for a sample) its 95%
    Wilson interval. With ``batches`` (the names each sampled batch drew), a part counts a
    batch's mutants only if every one of them of that part has a verdict: mutmut runs the
    mutants it expects to be fast first, so the part of a stopped batch it reached is no
    uniform sample."""
    from mutmut.stats import status_by_exit_code

    found = verdicts()
    population = {p: 0 for p in parts}
    for source, _ in found.values():
        part = part_of(source, parts)
        if part is not None:
            population[part] += 1
    for part in parts:
        names: set[str] | None = None
        note = ""
        if batches is not None:
            names, left = set(), 0
            for batch in batches:
                mine = {n for n in batch if n in found and part_of(found[n][0], [part])}
                if all(found[n][1] is not None for n in mine):
                    names |= mine
                else:
                    left += 1
            note = f", {left} unfinished batch(es) left out" if left else ""
        counts: dict[str, int] = {}
        for name, (source, code) in found.items():
            if part_of(source, [part]) is None or code is None:
                continue
            if names is not None and name not in names:
                continue
            status = status_by_exit_code[code]
            counts[status] = counts.get(status, 0) + 1
        reached = sum(counts.values())
        killed = counts.get("killed", 0) + counts.get("timeout", 0)
        low, high = wilson(killed, reached)
        kind = "sampled" if batches is not None else "reached"
        print(
            f"{part}: population {population[part]}, {kind} {reached}{note}, "
            f"{json.dumps(counts, sort_keys=True)}, score {killed}/{reached}"
            + (f" = {killed / reached:.1%} (95% Wilson {low:.1%} to {high:.1%})" if reached else "")
        )


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit 2 (no traceback)."""
    print(f"mutation_sample.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def count(text: str, what: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        fail(f"{what} must be an integer, got {text!r}")
    if value < least:
        fail(f"{what} must be >= {least}, got {value}")
    return value


def known_parts(parts: list[str]) -> None:
    """Every part names some mutated file of mutants/ (a misspelt part would score nothing)."""
    if not parts:
        fail("no PART given")
    sources = {source for source, _ in verdicts().values()}
    if not sources:
        fail(f"no mutants under {Path('mutants').resolve()}: run from mutmut's work folder")
    for part in parts:
        if not any(part_of(source, [part]) for source in sources):
            fail(f"part {part!r} matches no mutated file of mutants/")


def names_in(path: str) -> set[str]:
    try:
        return set(Path(path).read_text().split())
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")


def main(argv: list[str]) -> None:
    if not argv:
        fail("no command: generate, draw or score")
    command, rest = argv[0], argv[1:]
    if command == "generate":
        generate()
    elif command == "draw":
        skip: set[str] = set()
        if "--skip" in rest:
            i = rest.index("--skip")
            if i + 1 >= len(rest):
                fail("--skip needs a FILE")
            skip = names_in(rest[i + 1])
            rest = rest[:i] + rest[i + 2 :]
        if len(rest) < 3:
            fail("draw needs N SEED PART...")
        n, seed = count(rest[0], "N", 1), count(rest[1], "SEED", 0)
        known_parts(rest[2:])
        picked = draw(n, seed, rest[2:], skip)
        if not picked:
            fail("every mutant of these parts has a verdict or is skipped: nothing to draw")
        print("\n".join(picked))
    elif command == "score":
        batches = None
        if "--batches" in rest:  # --batches FILE... --parts PART...
            if "--parts" not in rest:
                fail("--batches FILE... needs --parts PART... after it")
            i, j = rest.index("--batches"), rest.index("--parts")
            batches = [names_in(f) for f in rest[i + 1 : j]]
            rest = rest[j + 1 :]
        known_parts(rest)
        score(rest, batches)
    else:
        fail(f"unknown command {command!r}: generate, draw or score")


if __name__ == "__main__":
    main(sys.argv[1:])
