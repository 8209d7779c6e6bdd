"""One tiny digits run: the proxy learns on the evaluator's features and the rounds report
the evaluator's naturalness and diversity."""

import math

from sqdf.bbo import BboConfig, run_method
from sqdf.config import TrainConfig


def test_digits_round_metrics_and_proxy(tmp_path):
    base = TrainConfig(
        task="digits", reward="ink", num_steps=3, batch_size=4, buffer_size=8, device="cpu",
        estimator="tweedie", alpha=0.1, task_params={"classes": [1, 7]},
    )  # fmt: skip
    bbo = BboConfig(rounds=2, queries_per_round=6, updates_per_round=1, proxy_steps=20)
    rows = run_method(bbo, base, "sqdf", 0, tmp_path / "run", progress=False)
    assert [r["queries"] for r in rows] == [6, 12]
    assert math.isfinite(rows[1]["proxy_rmse"]) and rows[1]["proxy_std"] > 0
    for key in ("eval_agreement", "eval_frechet", "eval_diversity", "ref_eval_agreement"):
        assert math.isfinite(rows[1][key])
    assert (tmp_path / "run" / "proxy" / "round_0000.safetensors").is_file()
