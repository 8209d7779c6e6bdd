"""--log-with: what goes to metrics.jsonl goes to the trackers, with the same names and steps,
a resumed run's series stays whole, and a missing tracker package is one clear line."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from sqdf.errors import ConfigError
from sqdf.infra.trackers import RunTrackers, flat_hparams, parse_log_with
from sqdf.run.folder import read_metrics
from sqdf.training.trainer import train


def tensorboard_events(run):
    """RUN/tensorboard as TensorBoard reads it (events an earlier attempt wrote past a resume
    point purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), purge_orphaned_data=True)
    events.Reload()
    return events


def tensorboard_scalars(run) -> dict[str, list[tuple[int, float]]]:
    events = tensorboard_events(run)
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def image_steps(run) -> list[int]:
    return [e.step for e in tensorboard_events(run).Images("samples")]


def metrics_series(run) -> dict[str, list[tuple[int, float]]]:
    rows = read_metrics(run)
    keys = [k for k, v in rows[0].items() if k != "step" and isinstance(v, int | float)]
    return {k: [(r["step"], float(r[k])) for r in rows] for k in keys}


def die_in_update(monkeypatch, n: int):
    """Make training stop with a KeyboardInterrupt in its update n (as a kill would, after
    the updates before it were logged); returns the real apply_update, to put back."""
    import sqdf.training.trainer

    real, calls = sqdf.training.trainer.apply_update, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sqdf.training.trainer, "apply_update", dies)
    return real


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


def assert_series_equal(tb: dict, jsonl: dict) -> None:
    assert tb.keys() == jsonl.keys()
    for tag, series in jsonl.items():
        assert [s for s, _ in tb[tag]] == [s for s, _ in series], tag
        assert all(same(a, b) for (_, a), (_, b) in zip(tb[tag], series, strict=True)), tag


def test_tensorboard_gets_every_metrics_row_and_the_config(tiny_config, tmp_path):
    cfg = dataclasses.replace(tiny_config, log_every=2, log_with="tensorboard")
    run = train(cfg, tmp_path / "run", progress=False)
    assert_series_equal(tensorboard_scalars(run), metrics_series(run))
    assert [s for s, _ in tensorboard_scalars(run)["reward_mean"]] == [2, 4, 6]
    (hparams,) = (run / "tensorboard").glob("*/hparams.yml")
    text = hparams.read_text()
    assert "train.alpha: 2.0" in text and "resolved.task_params.hidden: 16" in text


def test_a_resumed_run_logs_each_step_once(tiny_config, tmp_path, monkeypatch):
    import sqdf.training.trainer

    cfg = dataclasses.replace(tiny_config, log_every=1, checkpoint_every=3, sample_every=2,
                              log_with="tensorboard")  # fmt: skip
    real = die_in_update(monkeypatch, 5)  # updates 1-4 logged, checkpoint at 3: 4 again
    finished, real_finish = [], RunTrackers.finish
    monkeypatch.setattr(RunTrackers, "finish", lambda t: finished.append(1) or real_finish(t))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", progress=False)
    assert finished == [1]  # closed on the way out
    monkeypatch.setattr(sqdf.training.trainer, "apply_update", real)
    run = train(cfg, tmp_path / "run", resume=True, progress=False)
    series = tensorboard_scalars(run)
    assert [s for s, _ in series["reward_mean"]] == [1, 2, 3, 4, 5, 6]
    assert_series_equal(series, metrics_series(run))
    assert image_steps(run) == [2, 4, 6]  # the picture at 4 was made twice, kept once


def test_pictures_every_n_updates_leave_the_run_as_it_was(tiny_config, tmp_path):
    from safetensors.torch import load_file

    plain = train(tiny_config, tmp_path / "plain", progress=False)
    cfg = dataclasses.replace(tiny_config, sample_every=2, log_with="tensorboard")
    run = train(cfg, tmp_path / "run", progress=False)
    pictures = sorted(p.name for p in (run / "samples").iterdir())
    assert pictures == ["step_0000002.png", "step_0000004.png", "step_0000006.png"]
    assert image_steps(run) == [2, 4, 6]
    a, b = (load_file(str(r / "final" / "policy.safetensors")) for r in (plain, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def wandb_records(path):
    """The records of a W&B transaction log (an offline run's ``run-ID.wandb``), each a
    wandb.proto Record. The file is wandb's header (":W&B", magic 0xBEE1, version 0) then
    LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte header (CRC-32 of its
    type byte and data, length, type FULL 1, FIRST 2, MIDDLE 3 or LAST 4), a block's last
    bytes padding where a header no longer fits. wandb 0.31 reads it only in its Go core."""
    import zlib

    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 1 << 15
    assert data[:7] == b":W&B" + (0xBEE1).to_bytes(2, "little") + b"\0", data[:7]
    pos, parts = 7, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        crc = int.from_bytes(data[pos : pos + 4], "little")
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        assert kind in (1, 2, 3, 4) and zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, pos
        parts.append(chunk)
        pos += 7 + length
        if kind in (1, 4):  # a record's whole or last chunk
            record = Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record
    assert pos == len(data) and not parts  # no record cut short


def wandb_scalars(path) -> dict[str, list[tuple[int, float]]]:
    """Each logged scalar's (step, value) series in an offline run's ``.wandb`` file, less
    wandb's own (_step, _runtime, _timestamp)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            if not key.startswith("_"):
                value = json.loads(item.value_json)
                series.setdefault(key, []).append((record.history.step.num, float(value)))
    return series


def test_wandb_offline_gets_every_metrics_row_and_the_config(tiny_config, tmp_path, monkeypatch):
    from accelerate.state import PartialState

    pytest.importorskip("wandb")
    PartialState._reset_state()  # as in a fresh process: no earlier test made the state
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = dataclasses.replace(tiny_config, log_with="wandb")
    run = train(cfg, tmp_path / "run", progress=False)
    run_id = (run / "tracker_id.txt").read_text().strip()
    (folder,) = (run / "wandb").glob(f"offline-run-*-{run_id}")
    scalars = wandb_scalars(folder / f"run-{run_id}.wandb")
    assert_series_equal(scalars, metrics_series(run))
    assert [s for s, _ in scalars["reward_mean"]] == [2, 4, 6]
    (config,) = [r.config for r in wandb_records(folder / f"run-{run_id}.wandb")
                 if r.WhichOneof("record_type") == "config"]  # fmt: skip
    sent = {item.key: json.loads(item.value_json) for item in config.update}
    assert sent["train.alpha"] == 2.0 and sent["resolved.task_params.hidden"] == 16


def test_a_missing_tracker_package_names_the_extra(tiny_config, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    import sqdf.training.start
    from sqdf.bbo import BboConfig, run_method
    from sqdf.experiments.compare import compare

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sqdf.training.start, "build_task", no_model)
    cfg = dataclasses.replace(tiny_config, log_with="tensorboard,mlflow")
    message = r"--log-with mlflow needs the mlflow package: pip install 'sqdf\[mlflow\]'"
    with pytest.raises(ConfigError, match=message):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "tensorboard").exists()  # refused before anything started
    with pytest.raises(ConfigError, match=message):
        run_method(BboConfig(rounds=1, queries_per_round=2), cfg, "sqdf", 0, tmp_path / "bbo",
                   progress=False)  # fmt: skip
    assert not (tmp_path / "bbo").exists()
    base = {"task": "gmm2d", "device": "cpu", "log_with": "mlflow"}
    with pytest.raises(ConfigError, match=message):
        compare(base, ["best_of_n", "sqdf"], 1, tmp_path / "cmp", progress=False)
    assert not (tmp_path / "cmp").exists()


def test_a_tracker_that_fails_to_start_closes_the_others(tiny_config, tmp_path, monkeypatch):
    from accelerate import tracking

    from sqdf.errors import SqdfError

    def boom(self):
        raise RuntimeError("no API key configured\nmore detail")

    closed, real_finish = [], tracking.TensorBoardTracker.finish
    monkeypatch.setattr(tracking.WandBTracker, "start", boom)
    monkeypatch.setattr(tracking.TensorBoardTracker, "finish",
                        lambda t: closed.append(1) or real_finish(t))  # fmt: skip
    cfg = dataclasses.replace(tiny_config, log_with="tensorboard,wandb")
    with pytest.raises(SqdfError, match=r"^--log-with wandb: the tracker did not start: no API "
                                        r"key configured$"):  # fmt: skip
        train(cfg, tmp_path / "run", progress=False)
    assert closed == [1]


def test_resume_off_the_log_grid_and_with_trackers_added(tiny_config, tmp_path):
    # rows at 4 and at the last update 6 (off the grid of 4), checkpoints at 3 and 6; the
    # resumed run drops row 6 from metrics.jsonl, and so from TensorBoard
    cfg = dataclasses.replace(tiny_config, steps=6, log_every=4, checkpoint_every=3,
                              sample_every=3, log_with="tensorboard")  # fmt: skip
    run = train(cfg, tmp_path / "run", progress=False)
    run = train(dataclasses.replace(cfg, steps=12), run, resume=True, progress=False)
    assert [s for s, _ in tensorboard_scalars(run)["reward_mean"]] == [4, 8, 12]
    assert_series_equal(tensorboard_scalars(run), metrics_series(run))
    assert image_steps(run) == [3, 6, 9, 12]  # 6 sent again from its file after the purge
    # trackers and pictures may be added on resume: they do not change what is trained
    plain = dataclasses.replace(tiny_config, steps=6, checkpoint_every=3, log_every=1)
    train(dataclasses.replace(plain, steps=3), tmp_path / "later", progress=False)
    later = train(dataclasses.replace(plain, log_with="tensorboard", sample_every=2),
                  tmp_path / "later", resume=True, progress=False)  # fmt: skip
    assert [s for s, _ in tensorboard_scalars(later)["reward_mean"]] == [4, 5, 6]
    assert image_steps(later) == [4, 6]


def test_log_with_is_checked_and_configs_flatten():
    assert parse_log_with(" tensorboard, wandb ") == ["tensorboard", "wandb"]
    assert parse_log_with("") == []
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord' in log_with; known: "):
        parse_log_with("tensorbord")
    with pytest.raises(ConfigError, match="names a tracker twice"):
        parse_log_with("wandb,wandb")
    flat = flat_hparams({"a": 1, "t": {"b": [1, 2], "c": None, "d": {"e": True}}, "m": {}})
    assert flat == {"a": 1, "t.b": "[1, 2]", "t.c": "None", "t.d.e": True, "m": "{}"}


def test_python_dash_m_sqdf_is_the_sqdf_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sqdf", "presets"], capture_output=True,
                          text=True, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "sd15-aesthetic" in done.stdout
    json.dumps(done.stdout)  # plain text out


def test_watching_guide_example_writes_tensorboard_events(tmp_path, monkeypatch):
    import shlex

    from sqdf.cli import main
    from tests.doc_commands import doc_block

    block = doc_block("docs/guides/watching.md", "tensorboard --logdir runs/")
    train_line, watch_line = block.strip().splitlines()
    assert watch_line == "tensorboard --logdir runs/"
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(train_line)
    argv += ["--steps", "20", "--sample-every", "10", "--no-progress"]  # shorter than written
    assert main(argv[1:]) == 0
    series = tensorboard_scalars(tmp_path / "runs" / "watched")
    assert [s for s, _ in series["reward_mean"]] == [10, 20]
    assert image_steps(tmp_path / "runs" / "watched") == [10, 20]


def test_digits_pictures_reach_the_folder_and_tensorboard(tmp_path):
    from sqdf.config.train_config import TrainConfig
    from tests.tasks.test_digits import TINY

    cfg = TrainConfig(**TINY, sample_every=1, log_with="tensorboard")
    run = train(cfg, tmp_path / "run", progress=False)
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step_0000001.png", "step_0000002.png",
    ]  # fmt: skip
    assert image_steps(run) == [1, 2]
