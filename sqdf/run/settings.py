"""Where a run's settings come from: TrainConfig's built-in defaults < the task's defaults <
a preset < a --config file < flags. Each value keeps the name of the layer that set it, for
config.json and ``--dry-run``. Task defaults and presets are TOML files shipped in
``sqdf/presets/``."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from sqdf.config.params import suggest
from sqdf.config.train_config import TrainConfig, config_fields
from sqdf.errors import ConfigError
from sqdf.methods import METHODS, build_method_params
from sqdf.tasks import TASKS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DICT_KEYS = ("task_params", "reward_params", "method_params")
BUILT_IN = "built-in"
TASK_DEFAULTS_FILE = "task_defaults.toml"


def check_registered(cfg: TrainConfig) -> None:
    """The task and the method exist, the method's required replay strategy is set, and its
    groups (GRPO) fit the batch."""
    if cfg.task not in TASKS:
        raise ConfigError(
            f"unknown task {cfg.task!r}; known: {', '.join(sorted(TASKS))}"
            f"{suggest(cfg.task, TASKS)}"
        )
    if cfg.method not in METHODS:
        raise ConfigError(
            f"unknown method {cfg.method!r}; known: {', '.join(sorted(METHODS))}"
            f"{suggest(cfg.method, METHODS)}"
        )
    required = METHODS[cfg.method].buffer
    if required is not None and cfg.buffer != required:
        raise ConfigError(f"method {cfg.method!r} needs buffer = {required!r}, got {cfg.buffer!r}")
    if METHODS[cfg.method].grouped:
        size = build_method_params(cfg.method, cfg.method_params).group_size
        if cfg.batch_size % size:
            raise ConfigError(
                f"method {cfg.method!r} samples groups of group_size {size} per condition, "
                f"which must divide batch_size {cfg.batch_size} (set method_params.group_size "
                "or batch_size)"
            )
        if cfg.fresh_count % size:
            raise ConfigError(
                f"method {cfg.method!r} samples groups of group_size {size} per condition, "
                f"which must divide fresh_trajectories {cfg.fresh_trajectories}"
            )
    if METHODS[cfg.method].likelihood_ratio and cfg.buffer_dtype in ("bfloat16", "float16"):
        raise ConfigError(
            f"method {cfg.method!r} takes likelihood ratios of the stored steps, which states "
            f"rounded to buffer_dtype {cfg.buffer_dtype} would bias (each ratio would start "
            "away from 1); use buffer_dtype float32"
        )


def make_config(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """A checked TrainConfig from plain values; an unknown key is a ConfigError naming it and
    ``source``, as are an unknown task or method."""
    known = {f.name for f in config_fields()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key {unknown[0]!r} in {source}{suggest(unknown[0], known)}"
        )
    cfg = TrainConfig(**values)
    check_registered(cfg)
    return cfg


def _presets_folder() -> Any:
    return resources.files("sqdf") / "presets"


def _read(name: str) -> dict[str, Any]:
    return tomllib.loads((_presets_folder() / name).read_text(encoding="utf-8"))


def task_defaults(task: str) -> dict[str, Any]:
    """The defaults task ``task`` declares (an empty table for a task that keeps the built-in
    ones; nothing for an unknown task, which check_registered refuses with the known names)."""
    return _read(TASK_DEFAULTS_FILE).get(task, {})


@dataclass(frozen=True)
class Preset:
    """A named, shipped configuration: the settings of a published run."""

    name: str
    description: str
    source: str  # where its numbers come from
    notes: str
    needs: dict[str, str]  # dotted key -> what the user must give for it
    train: dict[str, Any]
    bbo: dict[str, Any] = field(default_factory=dict)  # a BBO experiment's [bbo] table
    # the processes its statistics over the gathered batch assume (global_std), where it says
    processes: int | None = None

    @property
    def is_bbo(self) -> bool:
        return bool(self.bbo)


def preset_names() -> list[str]:
    return sorted(
        p.name[: -len(".toml")]
        for p in _presets_folder().iterdir()
        if p.name.endswith(".toml") and p.name != TASK_DEFAULTS_FILE
    )


def load_preset(name: str) -> Preset:
    """The shipped preset ``name``; an unknown name is a ConfigError listing the known ones."""
    names = preset_names()
    if name not in names:
        raise ConfigError(
            f"unknown preset {name!r}; known: {', '.join(names)} (sqdf presets lists them)"
            f"{suggest(name, names)}"
        )
    doc = _read(f"{name}.toml")
    meta = doc.get("preset", {})
    return Preset(
        name=name,
        description=meta.get("description", ""),
        source=meta.get("source", ""),
        notes=meta.get("notes", ""),
        needs=dict(meta.get("needs", {})),
        train=doc.get("train", {}),
        bbo=doc.get("bbo", {}),
        processes=meta.get("processes"),
    )


def preset_processes_note(sources: dict[str, str] | None, world: int) -> str | None:
    """One line where a preset's ``global_std`` runs on fewer processes than the preset's
    notes assume: its std is then over fewer samples than in the run it reproduces."""
    source = (sources or {}).get("method_params.global_std", "")
    if not source.startswith("preset "):
        return None
    preset = load_preset(source.removeprefix("preset "))
    if preset.processes is None or world >= preset.processes:
        return None
    return (
        f"preset {preset.name}: global_std spans the batches of the processes, {world} here "
        f"and {preset.processes} in its notes: a std over fewer samples (sqdf presets shows "
        "the notes)"
    )


@dataclass
class Resolved:
    """Settings resolved through the layers: plain ``values`` for make_config, the ``bbo``
    table where one was given, and the layer each value (dotted for a parameter) came from."""

    values: dict[str, Any]
    sources: dict[str, str]
    bbo: dict[str, Any] = field(default_factory=dict)
    preset: Preset | None = None

    @property
    def task(self) -> str:
        """The task the layers name, else the built-in default (gmm2d)."""
        return str(self.values.get("task", TrainConfig.task))

    def config(self) -> TrainConfig:
        known = {f.name for f in config_fields()}
        unknown = sorted(set(self.values) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key {unknown[0]!r} in {self.source_of(unknown[0])}"
                f"{suggest(unknown[0], known)}"
            )
        return make_config(self.values, source=self.where_from())

    def where_from(self) -> str:
        layers = [s for s in dict.fromkeys(self.sources.values()) if s != BUILT_IN]
        return ", ".join(layers) or BUILT_IN

    def source_of(self, key: str) -> str:
        return self.sources.get(key, BUILT_IN)


def resolve_settings(
    *,
    flags: dict[str, Any] | None = None,
    config_file: dict[str, Any] | None = None,
    config_name: str = "--config",
    preset: str | None = None,
    needs: bool = True,
) -> Resolved:
    """Layer built-in < task defaults < ``preset`` < ``config_file`` < ``flags``. Parameter
    tables (task_params, reward_params, method_params) merge key by key; a [bbo] table in the
    preset or the file is kept apart in ``Resolved.bbo``. The task is the one the highest layer
    names (gmm2d when none does). A layer that sets alpha without kl_scale writes it in the
    summed convention: an alpha never takes its convention from another layer. ``needs``
    False skips the preset's list of what a training run must be given (a render needs the
    model alone)."""
    flags = dict(flags or {})
    file_values = dict(config_file or {})
    file_bbo = file_values.pop("bbo", {})
    chosen = load_preset(preset) if preset else None
    task = flags.get("task") or file_values.get("task")
    if chosen is not None and task and chosen.train.get("task", task) != task:
        raise ConfigError(
            f"preset {chosen.name!r} is a {chosen.train['task']!r} run; it cannot be used "
            f"with task {task!r}"
        )
    task = task or (chosen.train.get("task") if chosen else None) or TrainConfig.task
    layers = [(f"task defaults ({task})", task_defaults(task))]
    if chosen is not None:
        layers.append((f"preset {chosen.name}", chosen.train))
    layers += [(f"config {config_name}", file_values), ("flags", flags)]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, layer in layers:
        if "alpha" in layer and "kl_scale" not in layer:
            # an alpha is read in its own layer's convention: ours (sum) unless it says so
            layer = {**layer, "kl_scale": "sum"}
        for key, value in layer.items():
            if key in DICT_KEYS:
                if not isinstance(value, dict):
                    raise ConfigError(f"{key} must be a table in {name}, got {value!r}")
                for sub, v in value.items():
                    values.setdefault(key, {})[sub] = v
                    sources[f"{key}.{sub}"] = name
            else:
                values[key] = value
                sources[key] = name
    bbo: dict[str, Any] = {}
    for name, layer in ((f"preset {chosen.name}" if chosen else "", chosen.bbo if chosen else {}),
                        (f"config {config_name}", file_bbo)):  # fmt: skip
        for key, value in layer.items():
            bbo[key] = value
            sources[f"bbo.{key}"] = name
    if chosen is not None and needs:
        missing = [hint for key, hint in chosen.needs.items() if not _has(values, key)]
        if missing:
            raise ConfigError(f"preset {chosen.name!r} needs " + "; ".join(missing))
    return Resolved(values, sources, bbo, chosen)


def _has(values: dict[str, Any], dotted: str) -> bool:
    head, _, sub = dotted.partition(".")
    return sub in values.get(head, {}) if sub else head in values


def config_sources(cfg: TrainConfig, sources: dict[str, str] | None) -> dict[str, str]:
    """Every key of ``cfg`` (and each of its parameters) with the layer it came from. Without
    ``sources`` (a TrainConfig built in Python), a value equal to the built-in default is
    'built-in' and any other 'given'."""
    known = dict(sources or {})
    out: dict[str, str] = {}
    for f in config_fields():
        value = getattr(cfg, f.name)
        if f.name in DICT_KEYS:
            for sub in value:
                out[f"{f.name}.{sub}"] = known.get(f"{f.name}.{sub}", "given")
            continue
        if f.name in known:
            out[f.name] = known[f.name]
        elif sources is None and value != f.default:
            out[f.name] = "given"
        else:
            out[f.name] = BUILT_IN
    return out


def config_for(task: str, *, preset: str | None = None, **values: Any) -> TrainConfig:
    """A TrainConfig for ``task`` with its defaults (and ``preset``'s values) under ``values``:
    the Python counterpart of ``sqdf train --task TASK [--preset NAME] --key value ...``."""
    return resolve_settings(flags={"task": task, **values}, preset=preset).config()
