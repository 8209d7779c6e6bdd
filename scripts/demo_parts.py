"""Run `sqdf demo`'s work as three parts, each a process of its own, with the same functions,
settings and seeds as `sqdf.experiments.demo.run_demo`: to time each part by its CPU time, or to
run the two trainings side by side on a busy machine. Wrap each in `/usr/bin/time -v` for its time.

    python scripts/demo_parts.py sqdf RUN     # train SQDF into RUN, evaluate it
    python scripts/demo_parts.py refl RUN     # train the baseline into RUN/baseline, evaluate it
                                              # (start it once RUN/config.json exists)
    python scripts/demo_parts.py report RUN   # x̂0 quality, demo.png, report.html; the table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import sqdf.experiments.demo as demo
from sqdf.evaluation.evaluate import evaluate_run, load_run
from sqdf.evaluation.x0_quality import x0_estimator_quality
from sqdf.training.trainer import train


def main(part: str, out: Path) -> None:
    if part in ("sqdf", "refl"):
        method = "sqdf" if part == "sqdf" else demo.BASELINE
        folder = out if part == "sqdf" else out / demo.BASELINE_FOLDER
        run = train(demo.demo_config(method=method), folder, progress=False)
        evaluate_run(run, num_samples=demo.NUM_SAMPLES)
        return
    if part != "report":
        raise SystemExit(f"part must be sqdf, refl or report, got {part!r}")
    cfg = demo.demo_config()
    base = out / demo.BASELINE_FOLDER
    metrics = json.loads((out / "eval.json").read_text())
    base_metrics = json.loads((base / "eval.json").read_text())
    task = load_run(out)
    quality = x0_estimator_quality(task, num_samples=64)
    (out / "x0_quality.json").write_text(json.dumps(quality, indent=1))
    lead = [demo._side_by_side(out, cfg, task, metrics, base, base_metrics)]
    # the page's training and total times are not of one process here: written as 0
    demo._write_report(out, cfg, metrics, quality, task, 0.0, 0.0, lead)
    columns, rows = demo.summary_table(out)
    print(f"{'metric':<38}" + "".join(f"{c:>10}" for c in columns))
    for label, values in rows:
        cells = "".join(f"{v:>10.3f}" if v is not None else f"{'':>10}" for v in values)
        print(f"{label:<38}{cells}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
