"""Reference tables read from the code at build time, so that the documentation cannot drift
from it: configuration keys from the config dataclasses (default, help, the checks their
validation makes), task, method and reward parameters from their registries' dataclasses
(default and the comment beside each field), rewards and presets from their registries.

Each directive turns one table into Markdown and hands it to MyST:

    ```{sqdf-config} train|bbo
    ```
    ```{sqdf-params} tasks|methods|rewards
    ```
    ```{sqdf-presets}
    ```

    ```{sqdf-cli}
    ```

The Python API comes from autodoc.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
from collections.abc import Callable, Iterator
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

# --- plain values as Markdown -------------------------------------------------------------


def cell(text: Any) -> str:
    """One table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def code(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    if isinstance(value, str):
        text = repr(value) if value == "" else value
    return f"`{cell(text)}`" if text else ""


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def first_sentence(doc: str | None) -> str:
    text = " ".join((doc or "").split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


# --- what the code says about each field ----------------------------------------------------


def field_comments(cls: type) -> dict[str, str]:
    """The comment beside each field of dataclass ``cls`` (inherited fields too): the lines of
    comment right above it and the one at the end of its line, as the source writes them."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            out.update(_own_field_comments(base))
    return out


def _own_field_comments(cls: type) -> dict[str, str]:
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[str, str] = {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        line = node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments.get(line, ""))
            line -= 1
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        out[node.target.id] = " ".join(above + trailing).replace(" - ", "; ")
    return out


class _Constants(ast.NodeTransformer):
    """Names of module constants (tuples of choices) replaced by their values."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def visit_Name(self, node: ast.Name) -> ast.AST:
        value = getattr(self.module, node.id, None)
        if isinstance(value, dict):
            value = tuple(value)
        if isinstance(value, tuple | list) and all(isinstance(v, str) for v in value):
            return ast.copy_location(ast.Constant(tuple(value)), node)
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        if isinstance(node.value, ast.Name) and node.value.id == "self":
            return ast.copy_location(ast.Name(node.attr, ast.Load()), node)
        return self.generic_visit(node)


def field_checks(cls: type, method: str) -> dict[str, list[str]]:
    """The conditions ``cls.method`` demands through its ``need(condition, message)`` calls,
    by the fields each names (a condition under an ``if`` says so)."""
    func = getattr(cls, method)
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    module = sys.modules[cls.__module__]
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, list[str]] = {}

    def walk(stmts: list[ast.stmt], under: list[str]) -> None:
        for stmt in stmts:
            if isinstance(stmt, ast.If):
                test = ast.unparse(_Constants(module).visit(stmt.test))
                walk(stmt.body, [*under, test])
                continue
            if isinstance(stmt, ast.FunctionDef):
                walk(stmt.body, under)
                continue
            for call in ast.walk(stmt):
                is_need = isinstance(call, ast.Call) and getattr(call.func, "id", "") == "need"
                if not is_need or not call.args:
                    continue
                condition = call.args[0]
                fields = sorted(
                    {
                        n.attr
                        for n in ast.walk(condition)
                        if isinstance(n, ast.Attribute)
                        and getattr(n.value, "id", "") == "self"
                        and n.attr in names
                    }
                )
                text = ast.unparse(_Constants(module).visit(condition))
                if under:
                    text += " (when " + " and ".join(under) + ")"
                for name in fields:
                    out.setdefault(name, []).append(text)

    walk(tree.body, [])
    return out


def type_name(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


# --- the tables --------------------------------------------------------------------------------


def config_table(which: str) -> list[str]:
    """TrainConfig (``train``) or BboConfig (``bbo``) as a definition list: each key with its
    flag, type and default, its help text, and the checks its validation makes."""
    if which == "train":
        from sqdf.commands.args import DICT_FIELDS
        from sqdf.config.train_config import TrainConfig as cls

        checks = field_checks(cls, "_check")
        flags = {f.name: DICT_FIELDS.get(f.name, "--" + f.name.replace("_", "-"))
                 for f in dataclasses.fields(cls)}  # fmt: skip
    elif which == "bbo":
        from sqdf.bbo.config import BboConfig as cls

        checks = field_checks(cls, "__post_init__")
        flags = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(cls)}
    else:
        raise ValueError(f"sqdf-config takes train or bbo, got {which!r}")
    lines: list[str] = []
    for f in dataclasses.fields(cls):
        default = code(default_of(f))
        lines += [
            f"`{f.name}` · {type_name(f)} · default {default} · flag `{flags[f.name]}`",
            f": {cell(f.metadata.get('help', ''))}",
        ]
        if f.name in checks:
            lines += ["", "  Checked: " + "; ".join(code(c) for c in checks[f.name]) + "."]
        lines.append("")
    return lines


def params_tables(which: str) -> list[str]:
    """One table per registry entry: the parameters of each task, method or reward."""
    lines: list[str] = []
    for name, cls, intro in _registry(which):
        fields = dataclasses.fields(cls)
        comments = field_comments(cls)
        lines += ["", f":::{{rubric}} {which[:-1]} `{name}`", ":::", ""]
        lines += [cell(intro), ""] if intro else []
        if not fields:
            lines += ["No parameters.", ""]
            continue
        rows = [
            [f"`{f.name}`", cell(type_name(f)), code(default_of(f)), cell(comments[f.name])]
            for f in fields
        ]
        lines += [*table(["parameter", "type", "default", "note"], rows), ""]
    return lines


def _registry(which: str) -> Iterator[tuple[str, type, str]]:
    if which == "tasks":
        from sqdf.tasks import DEFAULT_REWARDS, TASKS

        for name in TASKS:
            cls = _task_settings(name)
            reward = f"Default reward: `{DEFAULT_REWARDS[name]}`."
            yield name, cls, f"{first_sentence(cls.__doc__)} {reward}"
    elif which == "methods":
        from sqdf.methods import METHODS

        for name, method in METHODS.items():
            needs = f" Needs buffer `{method.buffer}`." if method.buffer else ""
            yield name, method.params, first_sentence(method.params.__doc__) + needs
    elif which == "rewards":
        from sqdf.rewards import REWARDS

        for name, cls in REWARDS.items():
            grad = "" if getattr(cls, "differentiable", True) else " No gradient."
            intro = f"{first_sentence(cls.__doc__)} Scores: {cls.domain}.{grad}"
            yield name, cls, intro
    else:
        raise ValueError(f"sqdf-params takes tasks, methods or rewards, got {which!r}")


def _task_settings(name: str) -> type:
    """The parameter dataclass of task ``name`` (its module's one ``*Config`` dataclass)."""
    import importlib

    module = importlib.import_module(f"sqdf.tasks.{name}")
    found = [
        obj
        for obj in vars(module).values()
        if dataclasses.is_dataclass(obj)
        and isinstance(obj, type)
        and obj.__module__ == module.__name__
        and obj.__name__.endswith("Config")
    ]
    if len(found) != 1:
        raise ValueError(f"task {name!r}: expected one *Config dataclass, found {found}")
    return found[0]


def cli_reference() -> list[str]:
    """Every command of ``sqdf`` with its usage, description, arguments and examples, from
    the parser ``sqdf.cli.build_parser`` builds (help texts are plain text: shown as written)."""
    import argparse

    from sqdf.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {a.dest: a.help for a in sub._choices_actions}
    lines: list[str] = []
    for name, command in sub.choices.items():
        lines += ["", f"## `sqdf {name}`", "", cell(helps.get(name, "")), ""]
        lines += ["```text", command.format_usage().strip(), "```", ""]
        if command.description and command.description != parser.description:
            lines += [cell(command.description), ""]
        formatter = command._get_formatter()
        rows = []
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            names = ", ".join(action.option_strings) or (action.metavar or action.dest)
            metavar = (
                ""
                if action.nargs == 0 or not action.option_strings
                else (action.metavar or action.dest.upper())
            )
            help_text = formatter._expand_help(action) if action.help else ""
            rows.append([f"`{cell(names)}`", code(metavar), cell(help_text)])
        lines += [*table(["argument", "value", "meaning"], rows), ""]
        if command.epilog:
            lines += ["```text", command.epilog.rstrip(), "```", ""]
    return lines


def presets_table() -> list[str]:
    from sqdf.run.settings import load_preset, preset_names

    rows = []
    for name in preset_names():
        p = load_preset(name)
        task = p.train.get("task", "")
        needs = "<br>".join(f"`{cell(k)}`: {cell(v)}" for k, v in p.needs.items())
        kind = "`sqdf bbo`" if p.is_bbo else "`sqdf train`"
        rows.append([f"`{name}`", code(task), kind, cell(p.description), cell(p.source), needs])
    return table(["preset", "task", "for", "what it is", "its numbers come from", "you give"], rows)


def reward_summary() -> list[str]:
    from sqdf.rewards import REWARDS

    rows = [
        [
            f"`{name}`",
            cls.domain,
            "yes" if getattr(cls, "differentiable", True) else "no",
            ", ".join(f"`{f.name}`" for f in dataclasses.fields(cls)) or "none",
            cell(first_sentence(cls.__doc__)),
        ]
        for name, cls in REWARDS.items()
    ]
    return table(["reward", "scores", "gradient", "parameters", "what it is"], rows)


# --- directives ------------------------------------------------------------------------------


class _Generated(SphinxDirective):
    """Markdown made by a function of the directive's argument, parsed in place."""

    make: Callable[..., list[str]]
    has_content = False

    titles = False  # whether the Markdown has headings (then it must stand at a page's top level)

    def run(self) -> list[nodes.Node]:
        lines = type(self).make(*self.arguments)
        box = nodes.container()
        source = self.get_source_info()[0]
        self.state.nested_parse(StringList(lines, source=source), 0, box, match_titles=self.titles)
        return box.children


def _directive(make: Callable[..., list[str]], arguments: int, titles: bool = False) -> type:
    return type(
        make.__name__,
        (_Generated,),
        {"make": staticmethod(make), "required_arguments": arguments, "titles": titles},
    )


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("sqdf-config", _directive(config_table, 1))
    app.add_directive("sqdf-params", _directive(params_tables, 1))
    app.add_directive("sqdf-cli", _directive(cli_reference, 0, titles=True))
    app.add_directive("sqdf-presets", _directive(presets_table, 0))
    app.add_directive("sqdf-rewards", _directive(reward_summary, 0))
    # the tables follow the code, which Sphinx does not watch: read these pages every build
    app.connect("env-get-outdated", lambda app, env, added, changed, removed: GENERATED_PAGES)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


GENERATED_PAGES = ["reference/configuration", "reference/rewards-presets", "reference/cli"]
