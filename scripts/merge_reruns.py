"""The tables and plots of the experiments whose affected rows were rerun after a fix
(docs/results/reruns-after-ddpo-ratio-fix/README.md), drawn from the results.json files as the
docs show them: the original run's rows, each rerun method's rows in place of its old ones, and
the methods run afterwards appended. Nothing is trained.

    .venv/bin/python scripts/merge_reruns.py

writes docs/results/reruns-after-ddpo-ratio-fix/{digits-methods,bbo-gmm2d,bbo-digits}/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqdf.bbo.config import BboConfig
from sqdf.bbo.experiment import plot_curve
from sqdf.bbo.experiment import results_markdown as bbo_markdown
from sqdf.experiments.compare import pareto_plot
from sqdf.experiments.compare import results_markdown as compare_markdown
from sqdf.infra.atomic import atomic_write_text, make_folder

RESULTS = Path("docs/results")
RERUNS = RESULTS / "reruns-after-ddpo-ratio-fix"
# merged folder: (the original experiment, the folders whose methods replace or join its rows)
COMPARE = {
    "digits-methods": (
        "digits-methods",
        [RERUNS / "digits-ddpo", RERUNS / "digits-best-of-n", RESULTS / "digits-grpo"],
    )
}
BBO = {"bbo-gmm2d": ("bbo-gmm2d", [RERUNS / "bbo-gmm2d-ddpo"]),
       "bbo-digits": ("bbo-digits", [RERUNS / "bbo-digits-ddpo"])}  # fmt: skip


def _load(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "results.json").read_text())


def merge_compare(original: str, reruns: list[Path], out: Path) -> None:
    doc = _load(RESULTS / original)
    variants, runs = list(doc["variants"]), list(doc["runs"])
    for folder in reruns:
        rerun = _load(folder)
        runs = [r for r in runs if r["variant"] not in rerun["variants"]] + rerun["runs"]
        variants += [v for v in rerun["variants"] if v not in variants]
    runs.sort(key=lambda r: variants.index(r["variant"]))
    make_folder(out, "output folder")
    atomic_write_text(out / "results.md", compare_markdown(doc["task"], runs, variants))
    pareto_plot(doc["task"], runs, out / "pareto.png")


def merge_bbo(original: str, reruns: list[Path], out: Path) -> None:
    doc = _load(RESULTS / original)
    summary = dict(doc["methods"])
    for folder in reruns:
        summary.update(_load(folder)["methods"])  # in place: the table keeps the methods' order
    bbo = BboConfig(**doc["bbo"])
    make_folder(out, "output folder")
    atomic_write_text(out / "results.md", bbo_markdown(doc["task"], bbo, summary))
    plot_curve(summary, out / "bbo_curve.png", bbo)


def main() -> None:
    for name, (original, reruns) in COMPARE.items():
        merge_compare(original, reruns, RERUNS / name)
        print(f"wrote {RERUNS / name}/results.md, pareto.png")
    for name, (original, reruns) in BBO.items():
        merge_bbo(original, reruns, RERUNS / name)
        print(f"wrote {RERUNS / name}/results.md, bbo_curve.png")


if __name__ == "__main__":
    main()
