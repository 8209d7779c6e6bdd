"""The package's imports point one way: no module imports one that imports it back (counting
imports inside functions, which run sooner or later), and sqdf.core imports nothing else of
ours."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sqdf"


def _modules(package: Path) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the sqdf modules it imports anywhere in its body. Importing a.b.c also runs
    the packages a.b and a (unless the importer is inside them, where Python has run them)."""
    mods = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:  # from .a import x: relative to this module's package
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([module] if module else []))
                for alias in node.names:
                    full = f"{module}.{alias.name}"
                    targets.add(full if full in mods else module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        edges = set()
        for target in (t for t in targets if t in mods and t != name):
            edges.add(target)
            parts = target.split(".")
            for i in range(1, len(parts)):
                package = ".".join(parts[:i])
                if package in mods and package != name and not name.startswith(package + "."):
                    edges.add(package)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_graph_is_read_from_the_package():
    graph = import_graph()
    assert "sqdf.sampling.sampler" in graph["sqdf.training.fresh"]  # module level
    assert "sqdf.tasks.sd" in graph["sqdf.tasks"]  # inside a function
    assert "sqdf.core.kernel" in graph["sqdf.tasks.base"]


def test_relative_imports_are_read(tmp_path):
    pkg = tmp_path / "sqdf"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from .b import x\n")
    (pkg / "sub" / "b.py").write_text("from . import a\nfrom ..sub.a import y\n")
    assert cycles(import_graph(pkg)) == [["sqdf.sub.a", "sqdf.sub.b"]]


def test_core_imports_nothing_else_of_ours():
    graph = import_graph()
    outside = {
        (m, t) for m, ts in graph.items() if m.startswith("sqdf.core") for t in ts
        if not t.startswith("sqdf.core")
    }  # fmt: skip
    assert outside == set()


# The pipeline from the ground up (docs/internals.md, Layout): a part of the package imports
# only from the parts before it, so the folders read in this order.
PIPELINE = [
    "core", "errors", "version", "infra", "config", "assets", "evaluators", "rewards", "tasks",
    "sampling", "methods", "cost", "pretraining", "run", "evaluation", "training", "experiments",
    "bbo", "commands", "cli", "__main__",
]  # fmt: skip


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_every_part_of_the_package_is_in_the_pipeline():
    parts = {_part(m) for m in import_graph()} - {"sqdf"}
    assert parts == set(PIPELINE)


def test_the_folders_import_down_the_pipeline():
    rank = {part: i for i, part in enumerate(PIPELINE)}
    upward = {
        (m, t) for m, ts in import_graph().items() for t in ts
        if "sqdf" not in (_part(m), _part(t)) and rank[_part(t)] > rank[_part(m)]
    }  # fmt: skip
    assert upward == set()
