"""The documentation site (docs/): it builds with warnings as errors, its reference pages
hold what the code defines, every command on its pages runs (on the embedded defaults, shrunk
by tests/doc_commands.py) or, where it needs Stable Diffusion weights, is a valid sqdf command
line, and the built site works in headless Chromium: every page loads without errors with its
images decoded, the navigation reaches the pages and the search finds them."""

from __future__ import annotations

import dataclasses
import functools
import html
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from sqdf.cli import build_parser
from sqdf.config.train_config import tomllib
from sqdf.run.settings import load_preset, preset_names, resolve_settings
from tests.browser import open_urls
from tests.doc_commands import (
    SQDF,
    check_installer,
    code_blocks,
    command_lines,
    quick,
    run_by,
    run_sqdf,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# pages written before the site, included as they are; their commands are checked elsewhere
EXISTING = {"results.md", "performance.md", "reliability.md"}
PAGES = sorted(
    str(p.relative_to(DOCS))
    for p in DOCS.rglob("*.md")
    if p.parts[len(DOCS.parts)] not in ("_build", "results") and p.name not in EXISTING
)


@dataclass
class Site:
    returncode: int
    output: str
    html: Path


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """The site built once per test session (once for all pytest-xdist workers: the first
    builds, under a lock, the others read its result)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers
    out, result = root / "docs-site", root / "docs-site.json"
    with FileLock(str(root / "docs-site.lock")):
        if not result.exists():
            done = subprocess.run(
                [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                 "-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
                cwd=ROOT, capture_output=True, text=True, timeout=600,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
            output = done.stdout + done.stderr
            result.write_text(json.dumps({"returncode": done.returncode, "output": output}))
    built = json.loads(result.read_text())
    return Site(built["returncode"], built["output"], out / "html")


@pytest.fixture
def built(site: Site) -> Site:
    if site.returncode != 0:
        pytest.fail(f"the site did not build:\n{site.output[-4000:]}")
    return site


def test_site_builds_with_warnings_as_errors(site: Site) -> None:
    assert site.returncode == 0, site.output[-4000:]
    assert "WARNING" not in site.output and "ERROR" not in site.output, site.output[-4000:]


def page_text(site: Site, page: str) -> str:
    """The text of a built page, tags removed and entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", (site.html / page).read_text()))


def test_reference_pages_hold_what_the_code_defines(built: Site) -> None:
    from sqdf.bbo.config import BboConfig
    from sqdf.config.train_config import TrainConfig
    from sqdf.methods import METHODS
    from sqdf.rewards import REWARDS
    from sqdf.tasks.gmm2d import GMM2DConfig

    config = page_text(built, "reference/configuration.html")
    for cls in (TrainConfig, BboConfig, GMM2DConfig):
        for f in dataclasses.fields(cls):
            assert f.name in config, (cls.__name__, f.name)
    assert "0 < gamma <= 1" in config  # a check, as TrainConfig._check writes it
    assert "kl_scale in ('sum', 'mean', 'half_mean')" in config  # KL_SCALES' names, resolved
    assert "gmm2d process must" not in config  # checks of the task dataclasses are not shown
    for name in METHODS:
        assert f"method {name}" in config, name

    cli = page_text(built, "reference/cli.html")
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    for name, command in sub.choices.items():
        assert f"sqdf {name}" in cli, name
        for action in command._actions:
            for flag in action.option_strings:
                assert flag in cli, (name, flag)

    rewards_presets = page_text(built, "reference/rewards-presets.html")
    for name in [*REWARDS, *preset_names()]:
        assert name in rewards_presets, name
    assert load_preset("sd15-aesthetic").description in rewards_presets


def test_autodoc_documents_the_api(built: Site) -> None:
    api = page_text(built, "reference/api.html")
    for name in ("sqdf.train", "sqdf.config_for", "sqdf.core.kl.gaussian_kl",
                 "sqdf.core.loss.soft_q_loss", "sqdf.run.settings.resolve_settings"):  # fmt: skip
        assert name in api, name
    assert "per sample: ||mean_p - mean_q||² / (2 std²)" in api  # gaussian_kl's docstring


# --- every command of the pages ----------------------------------------------------------------


def _needs_weights(args: list[str]) -> bool:
    """Whether ``sqdf ARGS`` needs Stable Diffusion weights (task sd, or an sd preset)."""
    if "--task" in args and args[args.index("--task") + 1] == "sd":
        return True
    if "--preset" in args:
        name = args[args.index("--preset") + 1]
        return name not in preset_names() or load_preset(name).train.get("task") == "sd"
    return False


def _parses(args: list[str], where: str) -> None:
    try:
        build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: not a valid sqdf command line: sqdf {' '.join(args)}")


def _sqdf_args(argv: list[str]) -> tuple[str, list[str]] | None:
    """(launcher, sqdf arguments) of a command that runs sqdf, or None."""
    if argv[0] in SQDF:
        return "", argv[1:]
    if argv[0] in ("torchrun", "accelerate") and "-m" in argv:
        at = argv.index("-m")
        assert argv[at + 1] == "sqdf.cli", argv
        return argv[0], argv[at + 2 :]
    return None


def _launch(launcher: str, args: list[str], tmp_path: Path) -> None:
    """A launcher's command on 2 CPU processes, its --out made absolute (the processes run in
    the repository)."""
    from tests.test_distributed import launch

    assert launcher == "torchrun", f"run only torchrun commands here, got {launcher}"
    args = quick(args)
    at = args.index("--out") + 1
    args[at] = str(tmp_path / args[at])
    launch(["-m", "sqdf.cli", *args])
    assert (tmp_path / args[at]).is_dir()


@pytest.mark.parametrize("page", [p for p in PAGES if code_blocks((DOCS / p).read_text(), "bash")])
def test_page_commands_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command of the page in order, in one folder (an eval finds the run its train
    wrote): sqdf commands on the embedded defaults run, shrunk; those that need Stable
    Diffusion weights must parse (they will run once presets fetch their weights and a tiny
    stand-in Hub serves them); installers are checked against the repository."""
    monkeypatch.chdir(tmp_path)
    text = (DOCS / page).read_text()
    own = {b for _, _, b in run_by(text)}
    for block in [b for b in code_blocks(text, "bash") if b not in own]:
        for argv in command_lines(block):
            where = f"{page}: {' '.join(argv)}"
            found = _sqdf_args(argv)
            if found is None:
                check_installer(argv, where)
                continue
            launcher, args = found
            if _needs_weights(args):
                _parses(args, where)
            elif launcher:
                _launch(launcher, args, tmp_path)
            else:
                assert run_sqdf(args, monkeypatch) == 0, where
                if "--out" in args:
                    assert Path(args[args.index("--out") + 1]).is_dir(), where


@pytest.mark.parametrize("page", [p for p in PAGES if code_blocks((DOCS / p).read_text(), "toml")])
def test_page_config_files_are_valid(page: str) -> None:
    text = (DOCS / page).read_text()
    own = {b for _, _, b in run_by(text)}
    for block in [b for b in code_blocks(text, "toml") if b not in own]:
        resolve_settings(config_file=tomllib.loads(block), config_name=page).config()


def test_blocks_with_their_own_test_are_run_by_it() -> None:
    """Each block marked as run by a test of its own (README.md's and every page's): that
    test exists and reads the block's page, so no block is left out of both."""
    marked = 0
    for path in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        page = str(path.relative_to(ROOT))
        for test, lang, _block in run_by(path.read_text()):
            assert lang in ("bash", "toml", "python"), (page, lang)
            assert (ROOT / test).is_file(), (page, test)
            assert f'"{page}"' in (ROOT / test).read_text(), f"{test} does not read {page}"
            marked += 1
    assert marked >= 15


# --- the built site in a browser ---------------------------------------------------------------


@pytest.fixture
def served(built: Site) -> Iterator[str]:
    """The built site on an HTTP server on 127.0.0.1, as a reader's browser gets it."""
    handler = type(
        "Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}
    )
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(built.html))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_every_page_loads_without_errors_and_its_images_decode(built: Site, served: str) -> None:
    pages = sorted(str(p.relative_to(built.html)) for p in built.html.rglob("*.html"))
    pages = [p for p in pages if not p.startswith(("_", "doctrees"))]
    assert {"index.html", "getting-started.html", "results.html"} <= set(pages)
    checks = open_urls([served + p for p in pages], timeout_s=240)
    for page, check in zip(pages, checks, strict=True):
        assert check.errors == [], (page, check.errors)
        assert check.images == check.images_loaded, (page, check.images, check.images_loaded)
        assert check.title.endswith(f"sqdf {built_version()}"), (page, check.title)
    assert sum(c.images for c in checks) >= 10  # results.md's plots and the guides' pictures


def built_version() -> str:
    from sqdf.version import __version__

    return __version__


NAV_LINKS = """Array.from(document.querySelectorAll(SELECTOR))
  .map((a) => [a.href.split('#')[0], a.innerText.trim()])"""


def test_navigation_reaches_every_guide(built: Site, served: str) -> None:
    top, guides = open_urls(
        [served + "index.html", served + "guides/index.html"],
        probe=NAV_LINKS.replace("SELECTOR", "'.bd-navbar-elements a.nav-link, .bd-docs-nav a'"),
    )
    header = {text for _, text in top.probed}
    assert {"Getting started", "Concepts", "Guides", "Reference"} <= header, header
    sidebar = {href: text for href, text in guides.probed if "/guides/" in href}
    expected = {served + f"guides/{p.stem}.html" for p in (DOCS / "guides").glob("*.md")}
    expected.discard(served + "guides/index.html")
    assert expected <= set(sidebar), sorted(expected - set(sidebar))
    landed = open_urls(sorted(expected))
    for href, check in zip(sorted(expected), landed, strict=True):
        assert check.errors == [], (href, check.errors)
        assert check.title.startswith(sidebar[href]), (href, check.title, sidebar[href])


# Sphinx's search fills in its results one by one, then says how many it found
SEARCH_FINISHED = """(s => s !== null && /finished|did not match/.test(s.innerText))(
  document.querySelector('#search-results .search-summary'))"""


@pytest.mark.parametrize(
    ("query", "page"),
    [("Tweedie", "concepts.html"), ("FSDP", "guides/multi-gpu.html"),
     ("queries_per_round", "reference/configuration.html")],
)  # fmt: skip
def test_search_finds_the_page(built: Site, served: str, query: str, page: str) -> None:
    (check,) = open_urls(
        [served + f"search.html?q={query}"],
        until=SEARCH_FINISHED,
        probe="Array.from(document.querySelectorAll('#search-results li a'))"
        ".map((a) => a.href.split('#')[0])",
    )
    assert check.errors == []
    assert served + page in check.probed, check.probed
