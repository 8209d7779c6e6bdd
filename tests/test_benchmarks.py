"""The benchmark scripts run and write what they say (their numbers are not checked here:
speed is measured on purpose, never asserted)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_update_speed_times_sd_without_scoring(tmp_path, capsys):
    bench = load("update_speed")
    out = tmp_path / "sd.json"
    argv = ["--task", "sd", "--preset", "tiny", "--designs", "reference", "--updates", "2",
            "--eval-samples", "0", "--task-param", "gradient_checkpointing=false",
            "--parts", str(tmp_path / "parts"), "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    doc = json.loads(out.read_text())
    (result,) = doc["results"]
    assert doc["base"]["task_params"]["gradient_checkpointing"] is False
    assert result["s_per_update"] > 0 and result["reward_gain_per_s"] is None
    assert "| reference |" in capsys.readouterr().out


def test_update_speed_benchmark_compares_designs(tmp_path, capsys):
    bench = load("update_speed")
    out = tmp_path / "speed.json"
    argv = ["--task", "digits", "--updates", "3", "--designs", "reference,truncated_x2,replay2",
            "--eval-samples", "4", "--num-steps", "4", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    doc = json.loads(out.read_text())
    ref, trunc, replay = doc["results"]
    assert [r["design"] for r in doc["results"]] == ["reference", "truncated_x2", "replay2"]
    assert trunc["settings"] == {"rollout": "truncated", "buffer": "on_policy",
        "replay_ratio": 1, "batch_size": 16, "cells_per_trajectory": 2}  # fmt: skip
    assert replay["settings"]["replay_ratio"] == 2 and replay["settings"]["batch_size"] == 32
    assert [r["timed_updates"] for r in doc["results"]] == [2, 2, 2]
    assert all(r["s_per_update"] > 0 and r["peak_memory_gib"] > 0 for r in doc["results"])
    # both sample in their timed updates (replay2 at update 3 of 3, the reference at each);
    # which spends the larger share of its time sampling is a timing, not checked here
    assert 0 < replay["sampling_share"] < 1 and 0 < ref["sampling_share"] < 1
    assert "| truncated_x2 |" in capsys.readouterr().out


def test_update_speed_names_a_bad_design(capsys):
    bench = load("update_speed")
    with pytest.raises(SystemExit) as stop:
        bench.main(["--designs", "reference,replay0"])
    assert stop.value.code == 2
    assert "unknown design 'replay0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # 32 cells per update cannot come 3 per trajectory
        bench.main(["--designs", "reference,truncated_x3"])
    assert "design 'truncated_x3': its steps per trajectory must divide the batch (32)" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):  # replay8 is timed over whole cycles of 8 updates
        bench.main(["--designs", "reference,replay8", "--updates", "8"])
    assert "--updates must be >= 9" in capsys.readouterr().err


def test_the_flow_stage_runs_on_tiny_sd3_parts(tmp_path):
    """gpu_checks.sh's flow stage, on the tiny SD 3 parts: the flow kernel and Tweedie's x̂0
    through both benchmarks."""
    step = load("step_memory")
    argv = ["--preset", "tiny-sd3", "--parts", str(tmp_path / "parts"), "--batch-size", "2",
            "--out", str(tmp_path / "step.json")]  # fmt: skip
    assert step.main(argv) == 0
    assert json.loads((tmp_path / "step.json").read_text())["loss_finite"]
    speed = load("update_speed")
    argv = ["--task", "sd", "--preset", "tiny-sd3", "--parts", str(tmp_path / "parts"),
            "--batch-size", "2", "--designs", "reference,replay4", "--updates", "5",
            "--num-steps", "4", "--eval-samples", "0",
            "--out", str(tmp_path / "speed.json")]  # fmt: skip
    assert speed.main(argv) == 0
    results = json.loads((tmp_path / "speed.json").read_text())["results"]
    assert [r["design"] for r in results] == ["reference", "replay4"]


def test_step_memory_times_one_gradient_step(tmp_path, capsys):
    bench = load("step_memory")
    out = tmp_path / "step.json"
    argv = ["--preset", "tiny", "--parts", str(tmp_path / "parts"), "--batch-size", "2",
            "--step", "3", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["loss_finite"] and doc["step_s"] > 0 and doc["batch_size"] == 2
    assert doc["peak_gib"] >= doc["after_loading_gib"] > 0
    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--parts", str(tmp_path / "parts"), "--step", "50"])
    assert "--step must be in [0, 49], got 50" in capsys.readouterr().err


def test_buffer_memory_measures_every_store_and_dtype(tmp_path, capsys):
    bench = load("buffer_memory")
    out = tmp_path / "buffer.json"
    argv = ["--shapes", "sd15", "--trajectories", "2", "--steps", "2", "--dir", str(tmp_path),
            "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["states"] == 3 and len(doc["results"]) == 6
    by = {(r["store"], r["dtype"]): r for r in doc["results"]}
    states = 3 * 4 * 64 * 64  # values per trajectory
    assert by["memory", "float32"]["host_bytes_per_trajectory"] >= states * 4
    assert by["disk", "float32"]["host_bytes_per_trajectory"] < states
    assert by["disk", "bfloat16"]["disk_reserved_per_trajectory"] >= 2 * states * 2
    assert "| SD 1.5 at 512 px | 4x64x64 | disk | bfloat16 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "sd3"])
    assert "unknown shape 'sd3'" in capsys.readouterr().err
