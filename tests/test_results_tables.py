"""The tables under docs/results/ are what the code writes from their JSON: each experiment's
results.md and frontier.md (scripts/rewrite_tables.py), and the tables of the experiments
whose rows were rerun after a fix (scripts/merge_reruns.py). A change to how tables are
written shows here until those files are rewritten; the result pages copy their tables."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
FOLDERS = sorted(
    p.parent for p in RESULTS.rglob("*.json") if p.name in ("results.json", "frontier.json")
)


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("folder", sorted(set(FOLDERS)), ids=lambda p: str(p.relative_to(RESULTS)))
def test_experiment_tables_are_what_the_code_writes(folder: Path) -> None:
    written = load("rewrite_tables").tables(folder)
    assert written, folder
    for name, text in written.items():
        assert (folder / name).read_text() == text, (
            f"{folder / name} differs from what the code writes: "
            f"python scripts/rewrite_tables.py {folder.relative_to(ROOT)}"
        )


def test_merged_tables_are_what_the_code_writes(tmp_path: Path, monkeypatch) -> None:
    merge = load("merge_reruns")
    reruns = ROOT / merge.RERUNS
    monkeypatch.chdir(ROOT)  # the script names its folders from the repository root
    for name, (original, folders) in merge.COMPARE.items():
        merge.merge_compare(original, folders, tmp_path / name)
    for name, (original, folders) in merge.BBO.items():
        merge.merge_bbo(original, folders, tmp_path / name)
    for name in [*merge.COMPARE, *merge.BBO]:
        assert (reruns / name / "results.md").read_text() == (
            tmp_path / name / "results.md"
        ).read_text(), name


def test_the_pages_show_the_merged_rows() -> None:
    """The digits page's comparison and the BBO page's tables are the merged folders' rows."""
    reruns = RESULTS / "reruns-after-ddpo-ratio-fix"
    for page, name in (
        ("digits.md", "digits-methods"),
        ("bbo.md", "bbo-gmm2d"),
        ("bbo.md", "bbo-digits"),
    ):
        text = (RESULTS / page).read_text()
        rows = [
            r for r in (reruns / name / "results.md").read_text().splitlines() if r.startswith("| ")
        ]
        missing = [r for r in rows if r not in text]
        assert not missing, (page, name, missing)


def test_the_flow_gap_table_is_its_sources_rows() -> None:
    """docs/results/gmm2d-flow-gap/ holds the rows of the compare folders it names, relabelled
    (scripts/flow_gap_table.py), and the flow-gap page shows that table."""
    import json

    gap = load("flow_gap_table")
    stored = json.loads((RESULTS / "gmm2d-flow-gap" / "results.json").read_text())
    assert stored == json.loads(json.dumps(gap.merged(gap.ROWS, RESULTS), default=float))
    page = (RESULTS / "gmm2d-flow-gap.md").read_text()
    rows = [r for r in (RESULTS / "gmm2d-flow-gap" / "results.md").read_text().splitlines()
            if r.startswith("| ")]  # fmt: skip
    missing = [r for r in rows if r not in page]
    assert not missing, missing
