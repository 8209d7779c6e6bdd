"""Sphinx configuration of the sqdf documentation site: Markdown pages through MyST, the PyData
theme, references generated from the code (docs/_ext/sqdf_reference.py and
autodoc). Build: python -m sphinx -W -b html docs docs/_build/html"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # the sqdf package of this checkout, for autodoc
sys.path.insert(0, str(DOCS / "_ext"))

from sqdf.version import __version__  # noqa: E402

project = "sqdf"
author = "the sqdf authors"
copyright = "the sqdf authors, Apache-2.0"
release = version = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sqdf_reference",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "results/**/*.md", "results/README.md"]

# no dollarmath: MathJax would load from a CDN, and the site must work offline (the formulas
# are written in Unicode instead)
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # links like page.md#a-heading resolve, as on GitHub

autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_member_order = "bysource"

html_theme = "pydata_sphinx_theme"
html_title = f"sqdf {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "navbar_align": "left",
    "footer_start": ["copyright"],
    "footer_end": [],
}
# "auto" follows the reader's light or dark setting (left empty, the theme logs an error)
html_context = {"default_mode": "auto"}
html_static_path = ["_static"]
html_favicon = "_static/favicon.svg"
html_last_updated_fmt = None
# pages without sub-pages get no (empty) section navigation on the left
html_sidebars = {
    page: [] for page in ("index", "getting-started", "concepts", "performance", "reliability")
}  # fmt: skip


def _literal_bars(app, what, name, obj, options, lines):  # noqa: ANN001
    """Docstrings write |x| for an absolute value; reStructuredText would read |Δ| as a
    substitution that is not defined."""
    lines[:] = [line.replace("|", "\\|") for line in lines]


def setup(app):  # noqa: ANN001
    app.connect("autodoc-process-docstring", _literal_bars)
