"""The embedded digits task: shipped weights, LoRA policy vs reference, rewards, a short run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sqdf import SqdfError, TrainConfig, evaluate_run, sample_run, train
from sqdf.errors import ConfigError
from sqdf.evaluation.evaluate import load_run, sample_reference
from sqdf.rewards import build_reward
from sqdf.tasks import build_task
from sqdf.tasks.digits import shipped_model
from sqdf.tasks.digits_model import load_unet
from tests.learning import assert_reward_rose

TINY = dict(
    task="digits",
    device="cpu",
    num_steps=4,
    batch_size=4,
    buffer_size=8,
    steps=2,
    log_every=1,
    checkpoint_every=0,
)


def task(**kw):
    torch.manual_seed(0)
    return build_task(TrainConfig(**{**TINY, **kw}))


def test_shipped_weights_load_and_are_small():
    folder = shipped_model()
    total = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert total < 20e6
    for sub in ("unet", "cm"):
        unet = load_unet(folder / sub, sub)
        assert not any(p.requires_grad for p in unet.parameters())
        weights = load_file(str(folder / sub / "diffusion_pytorch_model.safetensors"))
        got = unet.state_dict()
        assert all(torch.equal(got[k], v.to(got[k].dtype)) for k, v in weights.items())


def test_missing_or_foreign_model_folder(tmp_path):
    with pytest.raises(SqdfError, match="scheduler"):
        task(task_params={"model": str(tmp_path)})
    with pytest.raises(SqdfError, match="config.json missing"):
        load_unet(tmp_path, "digits base model")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SqdfError, match="unknown type, not a UNet2DModel"):
        load_unet(tmp_path, "digits base model")
    (tmp_path / "config.json").write_text((shipped_model() / "unet" / "config.json").read_text())
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SqdfError, match="cannot load"):
        load_unet(tmp_path, "digits base model")


def test_policy_starts_as_reference_and_lora_changes_only_the_policy():
    t = task()
    x, steps, cond = torch.randn(3, 1, 16, 16), torch.full((3,), 501), torch.tensor([1, 4, 7])
    with torch.no_grad():
        ref = t.model_output(x, steps, cond, policy=False)
        assert torch.equal(t.model_output(x, steps, cond, policy=True), ref)
        for p in t.policy.parameters():
            if p.requires_grad:
                p.add_(0.05)
        assert not torch.allclose(t.model_output(x, steps, cond, policy=True), ref)
        assert torch.equal(t.model_output(x, steps, cond, policy=False), ref)
    trainable = [n for n, p in t.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert set(t.policy.state_dict()) == {n.removeprefix("backbone.") for n in trainable}


def test_estimators_are_differentiable_and_identity_after_the_last_step():
    t = task(estimator="consistency")
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    cond = torch.tensor([3, 8])
    for k in (0, 2):
        est = t.x0_after_step(x, torch.tensor([k, k]), cond)
        (g,) = torch.autograd.grad(est.sum(), x)
        assert g.abs().sum() > 0
    last = torch.tensor([3, 3])
    assert torch.equal(t.x0_after_step(x, last, cond), x)


@pytest.mark.parametrize(
    "name,params", [("ink", {}), ("classifier", {}), ("classifier", {"target": 3})]
)
def test_reward_gradients_match_finite_differences(name, params):
    reward = build_reward(name, params)
    cond = torch.tensor([2, 5])
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64) * 0.8 + 0.1
    if hasattr(reward, "_model"):
        reward._model.double()
    assert torch.autograd.gradcheck(
        lambda im: reward(im, cond), (x.requires_grad_(True),), eps=1e-6, atol=1e-5
    )


def test_rewards_score_what_they_say():
    from sqdf.assets.digits_data import load_digits

    images, labels = load_digits(16)
    clf = build_reward("classifier", {})
    right = clf(images[:200], labels[:200]).mean()
    wrong = clf(images[:200], (labels[:200] + 1) % 10).mean()
    assert right > -0.3 > wrong
    ink = build_reward("ink", {"scale": 2.0})
    assert float(ink(torch.ones(1, 1, 4, 4))[0]) == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="target"):
        build_reward("classifier", {"target": 12})


def test_bad_task_params_and_reward_domain():
    with pytest.raises(ConfigError, match="unknown parameter 'rank'"):
        task(task_params={"rank": 4})
    with pytest.raises(ConfigError, match="classes"):
        task(task_params={"classes": [3, 11]})
    with pytest.raises(ConfigError, match="image reward"):
        task(reward="linear")


def test_short_run_and_eval(tmp_path):
    # zeros and ones steered toward a 3: a reward the reference is far from (its own classes'
    # log-probabilities are near their maximum 0, and two updates move them little)
    cfg = TrainConfig(**TINY, reward="classifier", reward_params={"target": 3},
                      task_params={"classes": [0, 1]})  # fmt: skip
    run = train(cfg, tmp_path / "r", progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["kl_mean"] >= 0 for r in rows)
    assert rows[0]["kl_mean"] == 0 < rows[1]["kl_mean"]  # the policy left the reference
    assert_reward_rose(run)
    metrics = evaluate_run(run, num_samples=8)
    for key in (
        "eval_agreement",
        "ref_eval_agreement",
        "eval_frechet",
        "eval_diversity",
        "kl_path",
    ):
        assert key in metrics
    assert metrics["real_eval_agreement"] > 0.95
    # the reference's samples drawn once and shared (sqdf demo's two runs) give the same numbers
    shared = sample_reference(load_run(run), 8)
    assert evaluate_run(run, num_samples=8, reference=shared) == metrics
    with pytest.raises(SqdfError, match=r"reference samples given \(8\).*6 samples"):
        evaluate_run(run, num_samples=6, reference=shared)
    with pytest.raises(SqdfError, match="seed 7"):
        evaluate_run(run, num_samples=8, seed=7, reference=shared)
    picture = sample_run(run, num_samples=12)
    assert picture.exists() and picture.with_suffix(".safetensors").exists()
    saved = json.loads((run / "config.json").read_text())
    assert saved["resolved"]["reward"] == "classifier"
    assert load_file(str(run / "final" / "policy.safetensors"))
