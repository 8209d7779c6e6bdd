"""The run folder: config.json, metrics.jsonl, eval_metrics.jsonl (--eval-every),
checkpoints/, final/, eval.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqdf.config.train_config import TrainConfig
from sqdf.errors import SqdfError
from sqdf.infra.atomic import atomic_write_text, make_folder
from sqdf.infra.weights import pin, resolutions
from sqdf.run.settings import make_config

FORMAT = "sqdf-run"
FORMAT_VERSION = 1
# Fields that may differ when a run is resumed: extending training or changing how often
# it logs does not change what has been computed so far.
# what a resumed run may change: none of these changes what it trains
RESUMABLE_CHANGES = {
    "steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_skips", "log_with",
    "sample_every", "eval_every",
}  # fmt: skip
METRICS = "metrics.jsonl"  # a row every log_every updates
EVAL_METRICS = "eval_metrics.jsonl"  # a row every eval_every updates


def config_path(run: Path) -> Path:
    return run / "config.json"


def write_config(
    run: Path, cfg: TrainConfig, resolved: dict[str, Any], sources: dict[str, str]
) -> None:
    """config.json: the config as given, what it resolved to, and where each value came from
    (built-in, task defaults, a preset, a config file, flags)."""
    from sqdf.version import __version__

    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sqdf_version": __version__,
        "train": cfg.to_dict(),
        "resolved": resolved,
        "sources": sources,
        # every weight as given -> its repository, revision, commit and files (sha256 of a
        # single file); resume, eval, sample and report load these commits again
        "weights": resolutions(),
    }
    atomic_write_text(config_path(run), json.dumps(doc, indent=1))


def read_run_config(run: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The TrainConfig of an existing run folder; a clear SqdfError for anything else.
    ``overrides``: parameter tables (task_params, reward_params, method_params) merged key by
    key over the run's own, e.g. a model folder that moved since the run was trained."""
    run = Path(run)
    if not run.is_dir():
        raise SqdfError(f"run folder not found: {run}")
    path = config_path(run)
    if not path.is_file():
        raise SqdfError(f"not an sqdf run folder (no config.json): {run}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SqdfError(f"not an sqdf run folder (config.json is not JSON): {run}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SqdfError(f"not an sqdf run folder (config.json was not written by sqdf): {run}")
    if isinstance(doc.get("weights"), dict):
        pin(doc["weights"])  # the commits the run trained on, whatever the branches say now
    values = dict(doc["train"])
    for key, table in (overrides or {}).items():
        values[key] = {**values.get(key, {}), **table}
    return make_config(values, source=f"{path} with the flags" if overrides else str(path))


def prepare_run(run: Path, cfg: TrainConfig, resume: bool) -> TrainConfig | None:
    """Check the folder fits the request; return the run's saved config when resuming."""
    if resume:
        saved = read_run_config(run)
        for key, value in cfg.to_dict().items():
            if key not in RESUMABLE_CHANGES and getattr(saved, key) != value:
                raise SqdfError(
                    f"cannot resume {run}: {key} is {getattr(saved, key)!r} there, "
                    f"{value!r} now (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)"
                )
        if saved.lr_schedule != "constant" and cfg.steps != saved.steps:
            raise SqdfError(
                f"cannot resume {run} to steps {cfg.steps}: its lr_schedule {saved.lr_schedule} "
                f"decays over its {saved.steps} steps, and another length would change the "
                f"rate of every update left; resume it with steps {saved.steps}"
            )
        return saved
    if run.is_dir() and any(run.iterdir()):
        raise SqdfError(
            f"run folder {run} already exists and is not empty; resume it or pick another"
        )
    make_folder(run, "run folder")
    return None


def append_metrics(run: Path, row: dict[str, Any], name: str = METRICS) -> None:
    with (run / name).open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def truncate_metrics(run: Path, last_step: int, log_every: int, name: str = METRICS) -> int | None:
    """On resume, drop rows after ``last_step`` (they will be recomputed) and the row an
    earlier, shorter run wrote at its last step off its ``log_every`` grid (the saved
    config's), so the file reads as if the run had never stopped. Returns the first step
    dropped (None: none), from which the trackers drop theirs too."""
    path = run / name
    if not path.exists():
        return None
    keep, dropped = [], []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a kill mid-write
        if step <= last_step and step % log_every == 0:
            keep.append(line)
        else:
            dropped.append(step)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))
    return min(dropped, default=None)


def read_metrics(run: str | Path, name: str = METRICS) -> list[dict[str, Any]]:
    path = Path(run) / name
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.exists() else []
