"""The flow path's gap on gmm2d's well as one table: the rows of several ``sqdf compare``
folders under docs/results/ (each a factor moved from gmm2d-flow-quadratic's sqdf row toward
the setting that lands), each named by what it changed. Nothing is trained: the runs are copied
from the folders' results.json, relabelled, into docs/results/gmm2d-flow-gap/results.json, and
its results.md is written by ``sqdf compare``'s own table code (so scripts/rewrite_tables.py
and tests/test_results_tables.py hold it to the JSON like every other table).

    .venv/bin/python scripts/flow_gap_table.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqdf.experiments.compare import results_markdown
from sqdf.infra.atomic import atomic_write_text, make_folder

RESULTS = Path("docs/results")
OUT = RESULTS / "gmm2d-flow-gap"
FLOW = "task_params={'process': 'flow', 'noise_level': %s}"
SCHEDULE = "task_params={'process': 'flow', 'noise_level': %s, 'noise_level_end': %s}"
# (row label, source folder, the source's variant), in the table's order
ROWS: list[tuple[str, str, str]] = [
    ("today: tweedie, a 0.7, 50 steps", "gmm2d-flow-quadratic", "sqdf"),
    ("estimator: consistency", "gmm2d-flow-gap-estimator", "estimator=consistency"),
    ("estimator: gaussian_posterior", "gmm2d-flow-gap-estimator", "estimator=gaussian_posterior"),
    ("noise: a 0.85", "gmm2d-flow-gap-noise-fine", FLOW % "0.85"),
    ("noise: a 1.0", "gmm2d-flow-gap-noise", FLOW % "1.0"),
    ("noise: a 1.2", "gmm2d-flow-gap-noise-fine", FLOW % "1.2"),
    ("noise: a √2", "gmm2d-flow-gap-noise", FLOW % "1.4142135623730951"),
    ("noise: a √2 → 0.7 over the steps", "gmm2d-flow-gap-noise-schedule",
     SCHEDULE % ("1.4142135623730951", "0.7")),
    ("noise: a √2 → 0.35", "gmm2d-flow-gap-noise-schedule",
     SCHEDULE % ("1.4142135623730951", "0.35")),
    ("noise: a 1.2 → 0.5", "gmm2d-flow-gap-noise-schedule", SCHEDULE % ("1.2", "0.5")),
    ("noise: a 0.7 → √2", "gmm2d-flow-gap-noise-schedule",
     SCHEDULE % ("0.7", "1.4142135623730951")),
    ("time shift 3 (SD 3's grid)", "gmm2d-flow-gap-shift",
     "task_params={'process': 'flow', 'shift': 3.0}"),
    ("steps: 10", "gmm2d-flow-gap-num-steps", "num_steps=10"),
    ("steps: 20", "gmm2d-flow-gap-num-steps", "num_steps=20"),
    ("steps: 200", "gmm2d-flow-gap-num-steps", "num_steps=200"),
    ("discount: gamma 0.9", "gmm2d-flow-gap-gamma", "gamma=0.9"),
    ("updates: 1,000", "gmm2d-flow-gap-updates", "steps=1000"),
    ("a √2: exact soft value", "gmm2d-flow-gap-full-noise", "estimator=exact"),
    ("a √2: consistency", "gmm2d-flow-gap-full-noise", "estimator=consistency"),
    ("a √2: gaussian_posterior", "gmm2d-flow-gap-full-noise", "estimator=gaussian_posterior"),
    ("a √2, 200 steps: exact soft value", "gmm2d-flow-gap-full-noise-200", "estimator=exact"),
    ("a √2, 200 steps: tweedie", "gmm2d-flow-gap-full-noise-200", "estimator=tweedie"),
    ("the preset gmm2d-exact, a √2 (1 seed)", "gmm2d-flow-gap-preset", "sqdf"),
]  # fmt: skip


def merged(rows: list[tuple[str, str, str]], results: Path = RESULTS) -> dict[str, Any]:
    """The rows' runs, relabelled, as a compare results.json (task, variants, runs, sources)."""
    runs: list[dict[str, Any]] = []
    task = None
    for label, folder, variant in rows:
        doc = json.loads((results / folder / "results.json").read_text())
        picked = [r for r in doc["runs"] if r["variant"] == variant]
        if not picked:
            raise SystemExit(f"{folder} has no variant {variant!r}; it has {doc['variants']}")
        task = task or doc["task"]
        runs += [{**r, "variant": label} for r in picked]
    sources = [{"row": label, "folder": folder, "variant": v} for label, folder, v in rows]
    return {"task": task, "variants": [label for label, _, _ in rows], "runs": runs,
            "sources": sources}  # fmt: skip


def main() -> None:
    doc = merged(ROWS)
    make_folder(OUT, "output folder")
    atomic_write_text(OUT / "results.json", json.dumps(doc, indent=1, default=float))
    table = results_markdown(doc["task"], doc["runs"], doc["variants"])
    atomic_write_text(OUT / "results.md", table)
    print(f"wrote {OUT}/results.json, results.md")


if __name__ == "__main__":
    main()
