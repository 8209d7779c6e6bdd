"""Rewrite the tables of finished experiments from their JSON, with the current table code and
number formatting, without training anything: a ``sqdf compare`` folder's results.md (and
frontier.md, from frontier.json), a ``sqdf bbo`` folder's results.md. The plots are left as
they are.

    .venv/bin/python scripts/rewrite_tables.py docs/results/*/ docs/results/*/*/
    .venv/bin/python scripts/rewrite_tables.py --check docs/results/*/   # list what would change
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sqdf.bbo.config import BboConfig
from sqdf.bbo.experiment import results_markdown as bbo_markdown
from sqdf.core.frontier import FrontierPoint
from sqdf.experiments.compare import results_markdown as compare_markdown
from sqdf.experiments.frontier import SamplerOffset, frontier_markdown
from sqdf.infra.atomic import atomic_write_text


def tables(folder: Path) -> dict[str, str]:
    """File name -> the text the current code writes for it, from the folder's JSON files."""
    out: dict[str, str] = {}
    results = folder / "results.json"
    if results.is_file():
        doc = json.loads(results.read_text())
        if "bbo" in doc:  # sqdf bbo: the per-round summary is stored, the table is its last round
            out["results.md"] = bbo_markdown(doc["task"], BboConfig(**doc["bbo"]), doc["methods"])
        else:
            out["results.md"] = compare_markdown(doc["task"], doc["runs"], doc["variants"])
    frontier = folder / "frontier.json"
    if frontier.is_file():
        doc = json.loads(frontier.read_text())
        curve = doc.get("exact_frontier")
        offset = doc.get("sampler_offset")
        out["frontier.md"] = frontier_markdown(
            doc["task"],
            doc["runs"],
            None if curve is None else [FrontierPoint(**p) for p in curve],
            None if offset is None else SamplerOffset(**offset),
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--check", action="store_true", help="write nothing; list the files that differ")
    args = p.parse_args()
    for folder in args.folders:
        for name, text in tables(folder).items():
            path = folder / name
            if path.is_file() and path.read_text() == text:
                continue
            if args.check:
                print(f"differs: {path}")
            else:
                atomic_write_text(path, text)
                print(f"rewrote {path}")


if __name__ == "__main__":
    main()
