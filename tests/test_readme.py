"""The README: a quick start of at most 10 KB whose commands run as written (shrunk, on the
embedded defaults) or are checked against the repository, whose test command is the one CI
runs, and whose links land on files and headings that exist."""

import re
from pathlib import Path

import pytest

from tests.doc_commands import (
    ROOT,
    SQDF,
    check_installer,
    code_blocks,
    command_lines,
    run_by,
    run_sqdf,
)

README = (ROOT / "README.md").read_text()
TEST_COMMAND = "bash scripts/setup.sh --browser && .venv/bin/python -m pytest -q -n auto -rs"


def test_readme_is_at_most_10_kb():
    assert len(README.encode()) <= 10 * 1024, len(README.encode())


def test_ci_runs_the_readme_test_command():
    (test_cmd,) = [b.strip() for b in code_blocks(README, "bash") if "pytest" in b]
    assert test_cmd == TEST_COMMAND
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_readme_commands_run(tmp_path, monkeypatch):
    """Every other command of the README in order, in one folder: sqdf on the embedded
    defaults runs, shrunk (the demo among them); installers and the site's build are checked
    against the repository. The preset block is tests/test_hub_runs.py's."""
    monkeypatch.chdir(tmp_path)
    own = {b for _, _, b in run_by(README)}
    ran = []
    for block in code_blocks(README, "bash"):
        if block in own or block.strip() == TEST_COMMAND:
            continue
        for argv in command_lines(block):
            where = f"README.md: {' '.join(argv)}"
            if argv[0] in SQDF:
                assert run_sqdf(argv[1:], monkeypatch) == 0, where
                ran.append(argv[1])
            else:
                check_installer(argv, where)
    assert ran == ["demo", "train", "train"]
    assert (tmp_path / "runs" / "demo" / "report.html").is_file()
    assert (tmp_path / "runs" / "exact" / "final" / "policy.safetensors").is_file()


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and the site (myst_heading_anchors) write it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize(
    "link", sorted(set(re.findall(r"\]\(((?:docs/)[^)\s]+)\)", README))) + ["docs/images/demo.png"]
)
def test_readme_links_land(link):
    path, _, anchor = link.partition("#")
    target = ROOT / path
    assert target.is_file(), link
    if anchor:
        headings = re.findall(r"^#+ (.+)$", target.read_text(), flags=re.M)
        assert anchor in {slug(h) for h in headings}, link


def test_readme_status_table_says_no_sd_family_has_run():
    rows = [r for r in README.splitlines() if r.startswith("| [S") or r.startswith("| [FLUX")]
    assert len(rows) == 4
    for row in rows:
        assert row.rstrip().endswith("| no | no |"), row
    assert Path(ROOT / "docs/images/demo.png").stat().st_size > 0
