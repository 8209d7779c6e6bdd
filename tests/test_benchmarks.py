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


def test_sd_update_benchmark_writes_its_json(tmp_path, capsys):
    bench = load("sd_update")
    out = tmp_path / "r.json"
    argv = ["--preset", "tiny", "--updates", "2", "--parts", str(tmp_path / "parts"),
            "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["preset"] == "tiny" and result["batch_size"] == 4
    assert result["s_per_update"] > 0 and result["updates_timed"] == 1
    assert "| tiny |" in capsys.readouterr().out


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
