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


def main(argv: list[str]) -> None:
    command, rest = argv[0], argv[1:]
    if command == "generate":
        generate()
    elif command == "draw":
        skip: set[str] = set()
        if "--skip" in rest:
            i = rest.index("--skip")
            skip = set(Path(rest[i + 1]).read_text().split())
            rest = rest[:i] + rest[i + 2 :]
        print("\n".join(draw(int(rest[0]), int(rest[1]), rest[2:], skip)))
    elif command == "score":
        batches = None
        if "--batches" in rest:  # --batches FILE... --parts PART...
            i, j = rest.index("--batches"), rest.index("--parts")
            batches = [set(Path(f).read_text().split()) for f in rest[i + 1 : j]]
            rest = rest[j + 1 :]
        score(rest, batches)
    else:
        raise SystemExit(f"unknown command {command!r}: generate, draw or score")


if __name__ == "__main__":
    main(sys.argv[1:])
