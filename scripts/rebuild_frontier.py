"""Rewrite a ``sqdf compare --frontier`` folder's frontier outputs from its results.json: the
same runs, measured again against the exact frontier by the current sqdf.experiments.frontier
(after a change to how the distances are taken), without training anything.

    .venv/bin/python scripts/rebuild_frontier.py runs/results/gmm2d-frontier
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sqdf.errors import SqdfError
from sqdf.experiments.frontier import frontier_distances, write_frontier
from sqdf.infra.atomic import atomic_write_text


def rebuild(folder: Path) -> None:
    path = folder / "results.json"
    if not path.is_file():
        raise SqdfError(f"{folder} has no results.json: not a sqdf compare folder")
    doc = json.loads(path.read_text())
    if not doc.get("frontier"):
        raise SqdfError(f"{folder} is not a --frontier comparison")
    doc["runs"] = [{k: v for k, v in r.items() if not k.startswith("frontier_")}
                   for r in doc["runs"]]  # fmt: skip
    exact = frontier_distances(doc["task"], doc["base"], doc["runs"])
    atomic_write_text(path, json.dumps(doc, indent=1, default=float))
    write_frontier(doc["task"], doc["runs"], exact, folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path)
    for folder in p.parse_args().folders:
        rebuild(folder)
        print(f"rewrote {folder}/results.json, frontier.json, frontier.md, frontier.png")


if __name__ == "__main__":
    main()
