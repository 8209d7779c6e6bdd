"""The online loop on tiny gmm2d runs: the budget is spent exactly, every query is saved as it
arrives, a resumed run sends no query twice and ends where an uninterrupted one does, and a
bad oracle stops with a clear message or, when allowed, is excluded and counted."""

import importlib
import json

import pytest
import torch

from sqdf.bbo import BboConfig, OracleError, resume_bbo, run_bbo
from sqdf.bbo.data import EXCLUDED, OK, load_rounds
from sqdf.config.train_config import TrainConfig
from sqdf.errors import SqdfError
from tests.bbo.kill import killed_in_round_one_fine_tuning

BASE = TrainConfig(
    task="gmm2d", reward="quadratic", num_steps=5, batch_size=8, buffer_size=16, log_every=2,
    device="cpu", estimator="tweedie", gamma=1.0, task_params={"hidden": 8},
)  # fmt: skip
ORACLE = """
import torch
CALLS = []  # samples per call
FAIL_AT = set()  # call numbers (1-based) that raise
NAN_EVERY = 0  # every n-th sample gets NaN
def score(x, c, center=1.0):
    CALLS.append(x.shape[0])
    if len(CALLS) in FAIL_AT:
        raise ConnectionError("server down")
    v = -(x - center).pow(2).sum(1)
    if NAN_EVERY:
        v[::NAN_EVERY] = float("nan")
    return v.tolist()
"""


@pytest.fixture
def oracle_module(tmp_path, monkeypatch, request):
    name = f"oracle_{request.node.name.replace('[', '_').replace(']', '')}"
    (tmp_path / f"{name}.py").write_text(ORACLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(name)


def bbo(module, **kw) -> BboConfig:
    values = dict(oracle=f"{module.__name__}:score", rounds=3, queries_per_round=8,
                  oracle_batch=3, updates_per_round=2, proxy_steps=20)  # fmt: skip
    return BboConfig(**{**values, **kw})


def rows(out, run):
    return [json.loads(x) for x in (out / "runs" / run / "rounds.jsonl").read_text().splitlines()]


def test_budget_is_spent_exactly_and_every_query_is_saved(tmp_path, oracle_module):
    cfg = bbo(oracle_module, oracle_params={"center": 0.5})
    out = run_bbo(cfg, BASE, ["sqdf", "best_of_n"], 1, tmp_path / "b", progress=False)
    # two runs, each 3 rounds of 8 samples in calls of at most 3: 3 + 3 + 2
    assert oracle_module.CALLS == [3, 3, 2] * 6
    for run in ("sqdf-seed0", "best_of_n-seed0"):
        assert [r["queries"] for r in rows(out, run)] == [8, 16, 24]
        data = load_rounds(out / "runs" / run)
        assert len(data) == 3 and all(bool((d.status == OK).all()) for d in data)
        # the saved values are the oracle's for the saved samples
        for d in data:
            assert torch.allclose(d.value, -(d.samples.double() - 0.5).pow(2).sum(1))
    assert (out / "bbo_curve.png").stat().st_size > 5000
    summary = json.loads((out / "results.json").read_text())
    assert summary["budget"] == 24
    assert [r["queries"] for r in summary["methods"]["sqdf"]["rounds"]] == [8, 16, 24]


def test_crash_mid_round_loses_nothing_and_resume_does_not_requery(tmp_path, oracle_module):
    straight = run_bbo(bbo(oracle_module), BASE, ["sqdf"], 1, tmp_path / "s", progress=False)
    oracle_module.CALLS.clear()
    oracle_module.FAIL_AT.add(5)  # round 1's second call: 8 + 3 queries answered before it
    with pytest.raises(OracleError, match="server down.*11 queries answered before it are saved"):
        run_bbo(bbo(oracle_module), BASE, ["sqdf"], 1, tmp_path / "c", progress=False)
    run = tmp_path / "c" / "runs" / "sqdf-seed0"
    assert [int((d.status == OK).sum()) for d in load_rounds(run)] == [8, 3]
    oracle_module.FAIL_AT.clear()
    sent_before = sum(oracle_module.CALLS)
    resume_bbo(tmp_path / "c", progress=False)
    # only what was unanswered: round 1's 5 (the failed call's 3 again) and round 2's 8
    assert sum(oracle_module.CALLS) - sent_before == 24 - 11
    a, b = rows(straight, "sqdf-seed0"), rows(tmp_path / "c", "sqdf-seed0")
    assert [r["oracle_mean"] for r in a] == [r["oracle_mean"] for r in b]
    assert [r["queries"] for r in b] == [8, 16, 24]


def test_crash_while_fine_tuning_resumes_from_the_round(tmp_path, oracle_module, monkeypatch):
    straight = run_bbo(bbo(oracle_module), BASE, ["sqdf"], 1, tmp_path / "s", progress=False)
    oracle_module.CALLS.clear()
    with killed_in_round_one_fine_tuning(monkeypatch):
        run_bbo(bbo(oracle_module), BASE, ["sqdf"], 1, tmp_path / "c", progress=False)
    assert sum(oracle_module.CALLS) == 16
    resume_bbo(tmp_path / "c", progress=False)
    assert sum(oracle_module.CALLS) == 24  # round 2's 8, nothing of rounds 0-1 again
    a, b = rows(straight, "sqdf-seed0"), rows(tmp_path / "c", "sqdf-seed0")
    assert [r["oracle_mean"] for r in a] == [r["oracle_mean"] for r in b]


def test_a_disk_buffer_resumes_from_the_round(tmp_path, oracle_module, monkeypatch):
    disk = TrainConfig(**{**BASE.to_dict(), "buffer_store": "disk"})
    memory = run_bbo(bbo(oracle_module), BASE, ["sqdf"], 1, tmp_path / "m", progress=False)
    with killed_in_round_one_fine_tuning(monkeypatch):
        run_bbo(bbo(oracle_module), disk, ["sqdf"], 1, tmp_path / "c", progress=False)
    assert (tmp_path / "c" / "runs" / "sqdf-seed0" / "buffer" / "states.npy").is_file()
    resume_bbo(tmp_path / "c", progress=False)
    a, b = rows(memory, "sqdf-seed0"), rows(tmp_path / "c", "sqdf-seed0")
    assert [r["oracle_mean"] for r in a] == [r["oracle_mean"] for r in b]


def test_bad_values_are_excluded_and_counted_when_allowed(tmp_path, oracle_module):
    oracle_module.NAN_EVERY = 4  # 1 in each call of 3, 1 in the call of 2: 3 per round
    with pytest.raises(OracleError, match="non-finite.*--drop-bad-queries"):
        run_bbo(bbo(oracle_module), BASE, ["sqdf"], 1, tmp_path / "x", progress=False)
    out = run_bbo(
        bbo(oracle_module, drop_bad_queries=True), BASE, ["sqdf"], 1, tmp_path / "d",
        progress=False,
    )  # fmt: skip
    r = rows(out, "sqdf-seed0")
    assert [x["excluded"] for x in r] == [3, 3, 3] and r[-1]["excluded_total"] == 9
    assert [x["queries"] for x in r] == [8, 16, 24]  # excluded queries were still spent
    data = load_rounds(out / "runs" / "sqdf-seed0")
    assert all(int((d.status == EXCLUDED).sum()) == 3 for d in data)
    assert "| 9 |" in (out / "results.md").read_text()


def test_a_failing_call_is_excluded_whole_when_allowed(tmp_path, oracle_module):
    oracle_module.FAIL_AT.update({1, 4})
    out = run_bbo(
        bbo(oracle_module, drop_bad_queries=True), BASE, ["ddpo"], 1, tmp_path / "f",
        progress=False,
    )  # fmt: skip
    assert [x["excluded"] for x in rows(out, "ddpo-seed0")] == [3, 3, 0]


def test_resume_refuses_a_folder_with_missing_query_files(tmp_path, oracle_module):
    out = run_bbo(bbo(oracle_module), BASE, ["sqdf"], 1, tmp_path / "m", progress=False)
    (out / "runs" / "sqdf-seed0" / "queries" / "round_0000.safetensors").unlink()
    with pytest.raises(SqdfError, match="has 0 query file"):
        resume_bbo(out, progress=False)


def test_a_method_that_blows_up_is_a_result_and_is_not_retried(oracle_module, tmp_path):
    # an absurd learning rate: DRaFT's gradients turn non-finite and the trainer stops
    base = TrainConfig(**{**BASE.to_dict(), "lr": 1e12, "max_skips": 1, "method": "draft"})
    out = run_bbo(bbo(oracle_module), base, ["draft", "best_of_n"], 1, tmp_path / "o",
                  progress=False)  # fmt: skip
    doc = json.loads((out / "results.json").read_text())
    rows = doc["runs"]["draft"][0]
    assert "non-finite" in rows[-1]["diverged"] and len(rows) < 3
    assert doc["methods"]["draft"]["diverged"] and not doc["methods"]["best_of_n"]["diverged"]
    assert len(doc["runs"]["best_of_n"][0]) == 3  # the other method went on
    assert "| draft |" in (out / "results.md").read_text()
    calls = len(oracle_module.CALLS)
    resume_bbo(out, progress=False)
    assert len(oracle_module.CALLS) == calls  # nothing re-queried, the blow-up not retried
