"""The benchmark scripts run and write what they say (their numbers are not checked here:
speed is measured on purpose, never asserted)."""

import importlib.util
import json
from pathlib import Path

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
    argv = ["--task", "digits", "--updates", "2", "--designs", "reference,truncated",
            "--eval-samples", "4", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    doc = json.loads(out.read_text())
    assert [r["design"] for r in doc["results"]] == ["reference", "truncated"]
    assert doc["results"][1]["settings"]["rollout"] == "truncated"
    assert all(r["s_per_update"] > 0 and r["peak_memory_gib"] > 0 for r in doc["results"])
    assert "| truncated |" in capsys.readouterr().out
