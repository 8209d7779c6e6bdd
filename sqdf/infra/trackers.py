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

from sqdf.errors import ConfigError, SqdfError

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
        if isinstance(value, dict) and value:
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class RunTrackers:
    """The trackers of one run, opened by the main process before its first update.

    ``purge`` is the first update this attempt logs anew (on resume: after the checkpoint,
    or the first row metrics.jsonl dropped): TensorBoard drops what an earlier attempt logged
    from there on, so a resumed series has neither gaps nor the same step twice; wandb
    resumes the run of the same id (it keeps the first value of a step it was sent twice);
    MLflow and Trackio start a new run of the experiment.
    """

    def __init__(self, names: list[str], run: Path, config: dict[str, Any], purge: int):
        from accelerate.state import PartialState

        check_installed(names)
        PartialState()  # Accelerate's trackers log through its logger, which needs the state
        self.trackers: list[Any] = []
        try:
            for name in names:
                tracker = _open(name, run, purge)
                if hasattr(tracker, "start"):  # Accelerate before 1.0 started them when made
                    tracker.start()
                self.trackers.append(tracker)
                tracker.store_init_configuration(flat_hparams(config))
        except Exception as err:
            self.finish()  # the ones already open: no writer or run left behind
            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise SqdfError(f"--log-with {name}: the tracker did not start: {first}") from None

    def log(self, row: dict[str, Any], step: int) -> None:
        """The numbers of a metrics row at update ``step`` (non-finite ones too, where the
        tracker takes them: a NaN loss is what a skipped update logs)."""
        values = {k: float(v) for k, v in row.items() if k != "step" and _is_number(v)}
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        """A saved picture at update ``step``, to the trackers that take images (TensorBoard,
        wandb; MLflow and Trackio get the numbers only)."""
        import numpy as np
        from PIL import Image

        with Image.open(path) as picture:  # (H, W, 3) in [0, 1]
            image = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
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


def _open(name: str, run: Path, purge: int) -> Any:
    from accelerate import tracking

    title = f"{run.parent.name}/{run.name}"  # compare's seed and bbo's round names repeat
    if name == "tensorboard":
        # purge_step: events an earlier attempt wrote from there on are dropped on read
        return tracking.TensorBoardTracker("tensorboard", run, purge_step=purge)
    if name == "wandb":
        return tracking.WandBTracker(
            "sqdf", dir=str(run), name=title, id=_run_id(run), resume="allow"
        )
    if name == "mlflow":
        import mlflow

        # the user's store if set, else this run's folder (not the environment: a compare
        # or bbo process runs many runs)
        mlflow.set_tracking_uri(
            os.environ.get("MLFLOW_TRACKING_URI") or (run / "mlruns").resolve().as_uri()
        )
        return tracking.MLflowTracker(experiment_name="sqdf", run_name=title)
    if not hasattr(tracking, "TrackioTracker"):
        raise ConfigError("--log-with trackio needs a newer accelerate: pip install -U accelerate")
    return tracking.TrackioTracker("sqdf", name=title)


def _run_id(run: Path) -> str:
    """A stable id for the run folder (kept in it), so a resumed run logs to the same run."""
    path = run / "tracker_id.txt"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id
