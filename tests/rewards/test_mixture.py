"""Weighted reward mixtures (``--reward a=1.0,b=0.5``) and rewards without a gradient (JPEG
compressibility as DDPO defines it): each against an independent computation, and what the
methods that need a gradient say of the latter."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from sqdf.cli import main
from sqdf.errors import ConfigError
from sqdf.rewards import build_reward, is_differentiable
from sqdf.rewards.analytic import LinearReward
from sqdf.rewards.mixture import parse_mixture
from sqdf.run.folder import read_metrics
from sqdf.tasks import build_task

TINY = ["--num-steps", "3", "--steps", "2", "--batch-size", "4", "--buffer-size", "8",
        "--device", "cpu", "--no-progress"]  # fmt: skip


def test_parse_mixture_keeps_order_labels_and_weights():
    assert parse_mixture("aesthetic") is None
    assert parse_mixture("mod:fn") is None
    assert parse_mixture(" ink = 1.5 , classifier=-0.25 ") == {"ink": 1.5, "classifier": -0.25}
    assert list(parse_mixture("linear#b=2,linear#a=1")) == ["linear#b", "linear#a"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ink=inf", "the weight of 'ink' must be a finite number, got 'inf'"),
        ("ink=nan,classifier=1", "the weight of 'ink' must be a finite number, got 'nan'"),
        ("ink=heavy", "the weight of 'ink' must be a finite number, got 'heavy'"),
        ("ink=1,ink=2", "names 'ink' twice (label each: ink#a, ink#b)"),
        ("ink=1,=2", "'=2' is not NAME=WEIGHT"),
        ("ink#=1", "'ink#=1' is not NAME=WEIGHT"),
    ],
)
def test_bad_mixtures_are_one_line(spec, message):
    with pytest.raises(ConfigError) as err:
        parse_mixture(spec)
    assert message in str(err.value) and "\n" not in str(err.value)


def two_linear() -> tuple[object, LinearReward]:
    mixture = build_reward(
        "linear#a=0.5,linear#b=2.0",
        {"linear#a": {"b": [1.0, -1.0]}, "linear#b.b": [0.25, 3.0]},  # table and dotted key
    )
    return mixture, LinearReward(b=(0.5 * 1.0 + 2.0 * 0.25, 0.5 * -1.0 + 2.0 * 3.0))


def test_a_mixture_of_linear_rewards_is_the_linear_reward_of_the_mixed_vector(tiny_config):
    mixture, mixed = two_linear()
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mixture(x), mixed(x), rtol=1e-12, atol=1e-12)
    parts = mixture.parts(x)
    torch.testing.assert_close(parts["linear#a"], x @ torch.tensor([1.0, -1.0], dtype=x.dtype))
    # gmm2d's exact target and frontier read the mixture's closed form
    task = build_task(tiny_config)
    ref = task.reference_output()
    want = mixed.tilt(ref, 1.5)
    got = mixture.tilt(ref, 1.5)
    torch.testing.assert_close(got.means, want.means)
    torch.testing.assert_close(got.weights, want.weights)


def test_gmm2d_trains_on_a_mixture_as_on_the_mixed_linear_reward(tmp_path):
    mixed = ["--reward-param", "b=[1.0, 5.5]"]
    parts = ["--reward", "linear#a=0.5,linear#b=2.0", "--reward-param", "linear#a.b=[1.0, -1.0]",
             "--reward-param", "linear#b.b=[0.25, 3.0]"]  # fmt: skip
    assert main(["train", "--task", "gmm2d", "--out", str(tmp_path / "one"), *mixed, *TINY]) == 0
    assert main(["train", "--task", "gmm2d", "--out", str(tmp_path / "mix"), *parts, *TINY]) == 0
    one, mix = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "mix")
    for a, b in zip(one, mix, strict=True):
        assert b["reward_mean"] == pytest.approx(a["reward_mean"], rel=1e-5, abs=1e-6)
        assert b["kl_mean"] == pytest.approx(a["kl_mean"], rel=1e-4, abs=1e-7)
        # each component is logged, and they add up to the trained reward with their weights
        total = 0.5 * b["reward_linear#a_mean"] + 2.0 * b["reward_linear#b_mean"]
        assert total == pytest.approx(b["reward_mean"], rel=1e-6, abs=1e-6)  # float32 rewards
    resolved = json.loads((tmp_path / "mix" / "config.json").read_text())["resolved"]
    assert resolved["reward_params"] == {"linear#a": {"b": [1.0, -1.0]},
                                         "linear#b": {"b": [0.25, 3.0]}}  # fmt: skip


def test_digits_trains_and_evaluates_each_component(tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--task", "digits", "--reward", "ink=1.0,classifier=0.5",
            "--reward-param", "ink.scale=20", "--out", str(run), *TINY]  # fmt: skip
    assert main(argv) == 0
    for row in read_metrics(run):
        total = row["reward_ink_mean"] + 0.5 * row["reward_classifier_mean"]
        assert total == pytest.approx(row["reward_mean"], rel=1e-6, abs=1e-6)
    assert main(["eval", str(run), "--num-samples", "16"]) == 0
    metrics = json.loads((run / "eval.json").read_text())
    ink, classifier = metrics["rewards"]["ink"], metrics["rewards"]["classifier"]
    assert ink["trained"] and ink["weight"] == 1.0 and classifier["weight"] == 0.5
    combined = ink["mean"] + 0.5 * classifier["mean"]
    assert combined == pytest.approx(metrics["reward_mean"], rel=1e-5, abs=1e-6)
    assert ink["ref_mean"] + 0.5 * classifier["ref_mean"] == pytest.approx(
        metrics["ref_reward_mean"], rel=1e-5, abs=1e-6
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reward", "ink=1,classifier=1", "--reward-param", "scale=3"],
         "reward parameter 'scale': a mixture's parameters name their reward, as NAME.KEY=VALUE"),
        (["--reward", "ink=1,classifier=1", "--reward-param", "jpeg.quality=50"],
         "reward parameter for 'jpeg', which is not in the mixture (ink, classifier)"),
        (["--reward", "ink=1,classifier=1", "--reward-param", "ink.scale=inf"],
         "ink.scale must be a finite number, got inf"),
        (["--reward", "ink=1,linear=1"], "must score the same kind of sample"),
    ],
)  # fmt: skip
def test_bad_mixture_parameters_are_one_line(argv, message, tmp_path, capsys):
    code = main(["train", "--task", "digits", "--out", str(tmp_path / "x"), *argv, *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


# JPEG compressibility


def jpeg_kb(image: torch.Tensor, quality: int) -> float:
    """DDPO's definition written out: the 8-bit image saved as a JPEG file, its size in kB."""
    array = (image.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    mode_image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    with io.BytesIO() as out:
        mode_image.save(out, "JPEG", quality=quality)
        return len(out.getvalue()) / 1000


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_compressibility_is_minus_the_jpeg_size_in_kb(channels):
    g = torch.Generator().manual_seed(1)
    noise = torch.rand((2, channels, 32, 48), generator=g)
    flat = torch.full((1, channels, 32, 48), 0.4)
    images = torch.cat([noise, flat])
    reward = build_reward("jpeg", {})
    want = torch.tensor([-jpeg_kb(im, 95) for im in images])
    torch.testing.assert_close(reward(images), want.to(reward(images).dtype))
    assert reward(flat)[0] > reward(noise).max()  # a flat image compresses far better
    low = build_reward("jpeg", {"quality": 20})
    assert (low(noise) > reward(noise)).all()  # lower quality, smaller files


def test_a_dotted_module_in_a_mixture_takes_its_parameters():
    from sqdf.rewards.mixture import split_params

    weights = {"pkg.mod:f": 1.0, "ink": 0.5}
    params = {"pkg.mod:f.differentiable": False, "pkg.mod:f.scale": 2, "ink.scale": 3}
    assert split_params(weights, params) == {
        "pkg.mod:f": {"differentiable": False, "scale": 2}, "ink": {"scale": 3}
    }  # fmt: skip
    table = {"pkg.mod:f": {"scale": 4}}  # [reward_params."pkg.mod:f"] in a config file
    assert split_params(weights, table)["pkg.mod:f"] == {"scale": 4}
    assert not is_differentiable("json.decoder:f=1,ink=1", {"json.decoder:f.differentiable": False})


def test_what_declares_itself_not_differentiable():
    assert not is_differentiable("jpeg", {})
    assert is_differentiable("ink", {})
    assert not is_differentiable("ink=1,jpeg=0.1", {})
    assert not is_differentiable("json:dumps", {"differentiable": False})
    assert is_differentiable("json:dumps", {})
    with pytest.raises(ConfigError, match="differentiable must be true or false, got 'no'"):
        build_reward("json:dumps", {"differentiable": "no"})


@pytest.mark.parametrize("method", ["sqdf", "draft", "refl", "alignprop", "draft_kl"])
def test_gradient_methods_refuse_a_reward_without_a_gradient(method, tmp_path, capsys):
    run = tmp_path / "x"
    argv = ["train", "--task", "digits", "--method", method, "--reward", "jpeg", "--out", str(run),
            *TINY]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"method {method!r} back-propagates the reward's gradient" in err
    assert "ddpo, grpo" in err and "sqdf bbo" in err
    assert not (run / "final").exists()


def write_module(tmp_path, monkeypatch) -> None:
    (tmp_path / "user_jpeg.py").write_text(
        "import torch\n"
        "def darkness(images, cond):\n"
        "    return (1 - images.flatten(1).mean(1)).detach()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_users_reward_declared_not_differentiable_is_refused_by_sqdf(tmp_path, monkeypatch,
                                                                        capsys):  # fmt: skip
    write_module(tmp_path, monkeypatch)
    argv = ["train", "--task", "digits", "--reward", "user_jpeg:darkness", "--reward-param",
            "differentiable=false", "--out", str(tmp_path / "x"), *TINY]  # fmt: skip
    assert main(argv) == 2
    assert "reward 'user_jpeg:darkness' is not differentiable" in capsys.readouterr().err


def test_compare_and_dry_run_refuse_before_anything_trains(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--task", "digits", "--methods", "ddpo,sqdf", "--set", "reward=jpeg",
            "--steps", "1", "--seeds", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    assert "method 'sqdf' back-propagates" in capsys.readouterr().err
    assert not (out / "ddpo-seed0").exists()  # ddpo, first in the list, never trained
    assert main(["train", "--task", "digits", "--reward", "jpeg", "--dry-run"]) == 2


@pytest.mark.parametrize("method", ["ddpo", "grpo"])
def test_policy_gradient_methods_train_on_jpeg(method, tmp_path):
    run = tmp_path / method
    extra = ["--method-param", "group_size=2"] if method == "grpo" else []
    argv = ["train", "--task", "digits", "--method", method, "--reward", "jpeg", *extra,
            "--buffer", "on_policy", "--log-every", "1", "--out", str(run), *TINY]  # fmt: skip
    assert main(argv) == 0
    rows = read_metrics(run)
    assert all(r["reward_mean"] < 0 for r in rows)  # minus a size
    assert any(r["grad_norm"] > 0 for r in rows)  # the likelihood ratio's gradient


def test_best_of_n_and_bbo_take_jpeg(tmp_path):
    small = ["--set", "reward=jpeg", "--set", "num_steps=3", "--set", "batch_size=4",
             "--set", "buffer_size=8", "--set", "device='cpu'", "--seeds", "1",
             "--no-progress"]  # fmt: skip
    out = tmp_path / "cmp"
    code = main(["compare", "--task", "digits", "--methods", "best_of_n,ddpo", "--steps", "1",
                 "--num-samples", "8", "--best-of", "2", "--out", str(out), *small])  # fmt: skip
    assert code == 0
    bbo = tmp_path / "bbo"
    code = main(["bbo", "--task", "digits", "--methods", "sqdf,ddpo", "--rounds", "1",
                 "--queries-per-round", "8", "--updates-per-round", "1", "--out", str(bbo),
                 *small])  # fmt: skip
    assert code == 0
