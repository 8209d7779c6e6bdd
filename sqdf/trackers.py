"""Experiment trackers (``--log-with``): every metrics row a run appends to metrics.jsonl also
goes, with the same names and steps, to TensorBoard, Weights & Biases, MLflow or Trackio
through Accelerate's trackers, from the main process only; the run's config is logged as
hyperparameters. Each writes into the run folder where it keeps files: RUN/tensorboard,
RUN/wandb, RUN/mlruns (unless MLFLOW_TRACKING_URI says otherwise), so nothing needs the
network (wandb: ``WANDB_MODE=offline``)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from sqdf.errors import ConfigError

# tracker name -> (the module it needs, the pip extra that installs it, or None if required)
TRACKERS = {
    "tensorboard": ("tensorboard", None),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}


def parse_log_with(spec: str) -> list[str]:
    """The tracker names of a comma-separated ``--log-with`` value ("" = none), checked."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"unknown tracker {name!r} in log_with; known: {', '.join(TRACKERS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"log_with names a tracker twice: {spec!r}")
    return names


def check_installed(names: list[str]) -> None:
    """One line naming the extra to install for a tracker whose package is missing."""
    for name in names:
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            fix = f"pip install 'sqdf[{extra}]'" if extra else f"pip install {module}"
            raise ConfigError(f"--log-with {name} needs the {module} package: {fix}")


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A config as the flat scalar values every tracker takes: nested tables become
    ``table.key``, lists and None their text."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class RunTrackers:
    """The trackers of one run, opened by the main process before its first update.

    ``start`` is the update the run starts from (a resumed run's checkpoint): TensorBoard is
    told to drop what an earlier attempt logged after it, so a resumed series has neither
    gaps nor the same step twice; wandb resumes the run of the same id (it keeps the first
    value of a step it was sent twice); MLflow and Trackio start a new run of the experiment.
    """

    def __init__(self, names: list[str], run: Path, config: dict[str, Any], start: int):
        check_installed(names)
        self.trackers = [_open(name, run, start) for name in names]
        for tracker in self.trackers:
            if hasattr(tracker, "start"):  # Accelerate before 1.0 started them when made
                tracker.start()
            tracker.store_init_configuration(flat_hparams(config))

    def log(self, row: dict[str, Any], step: int) -> None:
        """The numbers of a metrics row at update ``step`` (non-finite ones too, where the
        tracker takes them: a NaN loss is what a skipped update logs)."""
        values = {k: float(v) for k, v in row.items() if k != "step" and _is_number(v)}
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        """A saved picture at update ``step``, to the trackers that take images (TensorBoard,
        wandb; MLflow and Trackio get the numbers only)."""
        from matplotlib.image import imread

        image = imread(path)[..., :3]  # (H, W, 3) in [0, 1]
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({name: [image]}, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _open(name: str, run: Path, start: int) -> Any:
    from accelerate import tracking

    if name == "tensorboard":
        # purge_step: events an earlier attempt wrote from start + 1 on are dropped on read
        return tracking.TensorBoardTracker("tensorboard", run, purge_step=start + 1)
    if name == "wandb":
        return tracking.WandBTracker(
            "sqdf", dir=str(run), name=run.name, id=_run_id(run), resume="allow"
        )
    if name == "mlflow":
        os.environ.setdefault("MLFLOW_TRACKING_URI", (run / "mlruns").resolve().as_uri())
        return tracking.MLflowTracker(experiment_name="sqdf", run_name=run.name)
    if not hasattr(tracking, "TrackioTracker"):
        raise ConfigError("--log-with trackio needs a newer accelerate: pip install -U accelerate")
    return tracking.TrackioTracker("sqdf", name=run.name)


def _run_id(run: Path) -> str:
    """A stable id for the run folder (kept in it), so a resumed run logs to the same run."""
    path = run / "tracker_id.txt"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id
