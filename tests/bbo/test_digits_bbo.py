"""One tiny digits run: the proxy learns on the evaluator's features, the policy is
fine-tuned on it, and the rounds report the evaluator's naturalness and diversity."""

import math
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from sqdf.bbo import BboConfig, run_method
from sqdf.bbo.data import load_round, round_path
from sqdf.bbo.proxy import ProxyEnsemble, feature_map
from sqdf.config.train_config import TrainConfig
from tests.learning import assert_lora_moved


def test_digits_round_metrics_and_proxy(tmp_path):
    base = TrainConfig(
        task="digits", reward="ink", num_steps=3, batch_size=4, buffer_size=8, device="cpu",
        estimator="tweedie", alpha=0.1, task_params={"classes": [1, 7]},
    )  # fmt: skip
    bbo = BboConfig(rounds=2, queries_per_round=6, updates_per_round=1)
    run = tmp_path / "run"
    rows = run_method(bbo, base, "sqdf", 0, run, progress=False)
    assert [r["queries"] for r in rows] == [6, 12]
    assert math.isfinite(rows[1]["proxy_rmse"]) and rows[1]["proxy_std"] > 0
    for key in ("eval_agreement", "eval_frechet", "eval_diversity", "ref_eval_agreement"):
        assert math.isfinite(rows[1][key])
    # the proxy fitted after round 0 learned its data: the unfitted proxy (zero weights)
    # predicts their mean, with an error of their variance; the fitted one is within half of
    # that on most points. The median, not the mean: a member's bootstrap resample leaves out
    # about a third of the points, where that member extrapolates
    data = load_round(round_path(run, 0))
    features, dim = feature_map(SimpleNamespace(device=torch.device("cpu")), "digits")
    proxy = ProxyEnsemble(dim, bbo.ensemble_size, bbo.proxy_hidden)
    proxy.load_state_dict(load_file(str(run / "proxy" / "round_0000.safetensors")))
    values = data.value[data.ok]
    with torch.no_grad():
        fitted = proxy.mean_std(features(data.samples[data.ok].float()))[0].double()
    assert values.numel() == 6
    errors = (fitted - values).pow(2)
    assert float(errors.median()) < 0.5 * float(values.var(unbiased=False))
    # and the policy of round 1's queries was fine-tuned on it
    assert_lora_moved(run / "train" / "round_0000" / "final" / "policy.safetensors")
