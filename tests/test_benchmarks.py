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
