"""sqdf compare, tiny: outputs are produced and well-formed; divergence is a result."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from sqdf.cli import main
from sqdf.core.frontier import exact_frontier, frontier_kl_at, frontier_point
from sqdf.errors import SqdfError
from sqdf.experiments.compare import BEST_OF_N, compare, plan_frontier, plan_variants
from sqdf.experiments.frontier import (
    SamplerOffset,
    add_frontier_distances,
    gmm2d_frontier,
    write_frontier,
)

from .core.test_soft_value import MIX, REWARDS

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(
    task="gmm2d",
    num_steps=5,
    steps=4,
    batch_size=8,
    buffer_size=16,
    log_every=2,
    checkpoint_every=0,
    device="cpu",
    estimator="tweedie",
    task_params={"hidden": 8},
)


def test_compare_two_methods_and_best_of_n(tmp_path):
    out = compare(
        BASE,
        ["sqdf", "draft", BEST_OF_N],
        1,
        tmp_path / "c",
        num_samples=64,
        best_of=4,
        progress=False,
    )
    doc = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in doc["runs"]] == ["sqdf", "draft", BEST_OF_N]
    for r in doc["runs"]:
        for key in ("reward_mean", "target_mode_tv", "target_sliced_w2", "reward_evals", "wall_s"):
            assert key in r
    assert doc["runs"][0]["updates"] == 4 and doc["runs"][2]["updates"] == 0
    # best-of-N is scored as the trained runs are: against the same reference draws
    sqdf_run, _, best = doc["runs"]
    for key in ("ref_reward_mean", "ref_target_mode_tv", "ref_target_sliced_w2"):
        assert best[key] == sqdf_run[key], key
    table = (out / "results.md").read_text()
    assert (
        table.count("\n| ") >= 4 and "target_mode_tv" in table and "Mean ± std over 1 seed" in table
    )
    for png in ("pareto.png", "curves.png", "samples.png"):
        assert (out / png).stat().st_size > 5000


def test_sweep_and_ddpo_gets_its_buffer(tmp_path):
    out = compare(
        BASE,
        ["sqdf"],
        2,
        tmp_path / "s",
        sweep=("gamma", [1.0, 0.5]),
        num_samples=32,
        progress=False,
    )
    doc = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in doc["runs"]] == [
        ("gamma=1.0", 0),
        ("gamma=1.0", 1),
        ("gamma=0.5", 0),
        ("gamma=0.5", 1),
    ]
    table = (out / "results.md").read_text()
    assert "±" in table and "- target_kl " in table  # gamma leaves the target where it is
    # alpha moves the exact target: the notes give its figures per variant
    out = compare(BASE, ["sqdf"], 1, tmp_path / "a", sweep=("alpha", [0.5, 2.0]),
                  num_samples=32, progress=False)  # fmt: skip
    (line,) = [x for x in (out / "results.md").read_text().splitlines() if "target_kl" in x]
    assert line.startswith("- target_kl: alpha=0.5 ") and ", alpha=2.0 " in line
    out = compare(BASE, ["ddpo"], 1, tmp_path / "d", num_samples=32, progress=False)
    cfg = json.loads((out / "runs" / "ddpo-seed0" / "config.json").read_text())
    assert cfg["train"]["buffer"] == "on_policy"


def test_a_diverging_run_is_recorded_not_fatal(tmp_path, monkeypatch):
    (tmp_path / "nan_reward.py").write_text(
        "import torch\ndef r(x, c):\n    return x.flatten(1).sum(1) * float('nan')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    base = {
        **BASE,
        "reward": "nan_reward:r",
        "max_skips": 2,
        "task": "digits",
        "task_params": {"classes": [1]},
        "num_steps": 3,
        "batch_size": 2,
        "buffer_size": 4,
    }
    out = compare(base, ["sqdf"], 1, tmp_path / "n", num_samples=8, progress=False)
    doc = json.loads((out / "results.json").read_text())
    assert "diverged" in doc["runs"][0] and "1/1" in (out / "results.md").read_text()


def test_bad_compare_input(tmp_path, capsys):
    with pytest.raises(SqdfError, match="unknown method 'ppo'"):
        plan_variants(["ppo"], None)
    assert (
        main(["compare", "--methods", "sqdf", "--sweep", "gamma", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "--sweep expects KEY=V1,V2" in capsys.readouterr().err
    assert main(["compare", "--set", "alhpa=1", "--out", str(tmp_path / "y")]) == 2
    assert "did you mean 'alpha'" in capsys.readouterr().err
    # a variant's bad setting is found before any variant trains
    argv = ["compare", "--sweep", "alpha=0.5,0", "--out", str(tmp_path / "z")]
    assert main(argv) == 2 and "needs alpha > 0" in capsys.readouterr().err
    assert not (tmp_path / "z" / "runs").exists()


def test_compare_takes_the_task_from_the_config_file(tmp_path):
    toml = tmp_path / "digits.toml"
    toml.write_text('task = "digits"\nreward = "ink"\nnum_steps = 2\nbatch_size = 2\n'
                    'buffer_size = 4\ncheckpoint_every = 0\ndevice = "cpu"\n')  # fmt: skip
    out = tmp_path / "c"
    argv = ["compare", "--config", str(toml), "--methods", "sqdf", "--seeds", "1", "--steps",
            "1", "--num-samples", "8", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["task"] == "digits" and "diverged" not in doc["runs"][0]


def test_frontier_runs_each_method_over_its_regularisation(tmp_path, capsys):
    out = tmp_path / "f"
    # no --task: the built-in default, gmm2d
    argv = ["compare", "--frontier", "--methods", "sqdf,draft,best_of_n",
            "--frontier-values", "sqdf=2.0,0.5", "--frontier-values", "draft=1,4",
            "--frontier-values", "best_of_n=2,8", "--seeds", "1", "--num-samples", "256",
            "--out", str(out), "--no-progress"]  # fmt: skip
    argv += [f"--set={k}={json.dumps(v)}" for k, v in BASE.items() if k[:4] != "task"]
    argv += ["--set", "task_params={hidden = 8}"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Distance to the exact frontier" in printed and "frontier.png" in printed
    doc = json.loads((out / "frontier.json").read_text())
    runs = {r["variant"]: r for r in doc["runs"]}
    assert list(runs) == ["sqdf-alpha=2", "sqdf-alpha=0.5", "draft-steps=1", "draft-steps=4",
                          "best_of_n-best_of=2", "best_of_n-best_of=8"]  # fmt: skip
    assert runs["sqdf-alpha=0.5"]["value"] == 0.5 and runs["draft-steps=1"]["updates"] == 1
    curve = doc["exact_frontier"]
    assert curve[0]["kl"] < 1e-9 and all(
        a["kl"] < b["kl"] for a, b in zip(curve, curve[1:], strict=False)
    )
    for r in doc["runs"]:
        # no sampler beats the exact frontier at its own KL: best-of-n's KL is exact for a
        # continuous reward, a trained run's path KL bounds its output's KL from above
        noise = 4 * r["reward_std"] / 256**0.5
        assert r["frontier_gap"] > -noise, r["variant"]
        assert r["frontier_gap"] == pytest.approx(r["frontier_reward"] - r["reward_mean"])
    # results.json carries the same distances
    results = json.loads((out / "results.json").read_text())
    assert results["frontier"] and "frontier_gap" in results["runs"][0]
    table = (out / "frontier.md").read_text()
    assert "| sqdf | alpha=0.5 |" in table and "| best_of_n | best_of=8 |" in table
    assert (out / "frontier.png").stat().st_size > 5000
    # scripts/rebuild_frontier.py measures the same runs again: the same distances
    spec = importlib.util.spec_from_file_location(
        "rebuild", ROOT / "scripts" / "rebuild_frontier.py"
    )
    rebuild = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rebuild)
    rebuild.rebuild(out)
    again = json.loads((out / "results.json").read_text())["runs"]
    assert [r["frontier_gap"] for r in again] == [r["frontier_gap"] for r in results["runs"]]
    with pytest.raises(SqdfError, match="has no results.json"):
        rebuild.rebuild(tmp_path)


def test_frontier_on_a_task_without_an_exact_curve(tmp_path):
    records = [
        {"variant": f"sqdf-alpha={a:g}", "method": "sqdf", "knob": "alpha", "value": a,
         "seed": s, "kl_path": 1 / a + s, "reward_mean": 2 - a, "eval_agreement": 0.9,
         "eval_frechet": 3.0 + a}
        for a in (0.5, 2.0) for s in (0, 1)
    ]  # fmt: skip
    write_frontier("digits", records, None, tmp_path)
    table = (tmp_path / "frontier.md").read_text()
    assert "eval_frechet" in table and "frontier_gap" not in table
    assert "| sqdf | alpha=0.5 | 2.500 ± 0.707 | 1.500 ± 0.000 |" in table
    assert json.loads((tmp_path / "frontier.json").read_text())["exact_frontier"] is None
    assert (tmp_path / "frontier.png").stat().st_size > 5000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(frontier=True, sweep=("gamma", [1.0])), "drop --sweep"),
        (dict(frontier_values={"sqdf": [1.0]}), "--frontier-values needs --frontier"),
        (dict(frontier=True, frontier_values={"draft": [1]}), "names 'draft', which is not"),
        (dict(frontier=True, frontier_values={"sqdf": ["big"]}), "values must be numbers"),
        (dict(frontier=True, frontier_values={"sqdf": [1.0, 1]}), "repeat one"),
    ],
)
def test_bad_frontier_input(tmp_path, kwargs, message):
    with pytest.raises(SqdfError, match=message):
        compare(BASE, ["sqdf"], 1, tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x" / "runs").exists()


def test_frontier_defaults_follow_the_base():
    base = {**BASE, "alpha": 2.0, "steps": 40}
    variants = plan_frontier(["sqdf", "draft", BEST_OF_N], base)
    assert [v.value for v in variants if v.method == "sqdf"] == [8.0, 4.0, 2.0, 1.0, 0.5]
    assert [v.value for v in variants if v.method == "draft"] == [10, 20, 40]
    assert [v.overrides for v in variants if v.method == BEST_OF_N][0] == {"best_of": 2}
    (grpo,) = plan_frontier(["grpo"], {**base, "method_params": {"group_size": 2}},
                            {"grpo": [0.5]})  # fmt: skip
    assert grpo.overrides == {"method": "grpo", "method_params": {"group_size": 2, "beta": 0.5}}
    # betas on the exact KL per dimension (the scale of Flow-GRPO's), over D for the summed one;
    # whole updates
    dims = {**base, "dims": 2}
    assert [v.value for v in plan_frontier(["grpo"], dims)] == [0.08, 0.02, 0.005, 0.0]
    short = plan_frontier(["draft"], {**base, "steps": 10})
    assert [v.value for v in short] == [2, 5, 10]
    with pytest.raises(SqdfError, match="whole numbers >= 1, got 0.5"):
        plan_frontier([BEST_OF_N], base, {BEST_OF_N: [0.5]})


def test_frontier_distances_take_the_samplers_offset_and_skip_blown_up_runs(tmp_path):
    curve = exact_frontier(REWARDS[0], MIX)
    point = frontier_point(REWARDS[0], MIX, 2.0)
    ref = curve[0].reward
    good = {
        "variant": "sqdf-alpha=2",
        "method": "sqdf",
        "knob": "alpha",
        "value": 2.0,
        "seed": 0,
        "kl_path": point.kl,
        "reward_mean": point.reward - 0.05 + 0.1,
        "ref_reward_mean": ref + 0.1,
    }  # the sampler is 0.1 above the exact reference
    blown = {
        **good,
        "variant": "draft-steps=4",
        "method": "draft",
        "knob": "steps",
        "value": 4,
        "kl_path": math.inf,
        "reward_mean": 3e17,
    }
    diverged = {"variant": "draft-steps=8", "method": "draft", "knob": "steps", "value": 8,
                "seed": 0, "diverged": "the loss was nan"}  # fmt: skip
    records = [good, blown, diverged]
    add_frontier_distances(records, curve, 0.1)
    assert good["frontier_offset"] == 0.1
    assert good["frontier_gap"] == pytest.approx(0.05, abs=1e-3)  # linear between points
    assert good["frontier_kl_excess"] == pytest.approx(point.kl - frontier_kl_at(
        curve, point.reward - 0.05), abs=1e-9)  # fmt: skip
    assert "frontier_gap" not in blown and "frontier_gap" not in diverged
    # an infinite KL in the table: no crash
    write_frontier("gmm2d", records, (curve, SamplerOffset(0.1, 0.01, 100)), tmp_path)
    table = (tmp_path / "frontier.md").read_text()
    assert "| draft | steps=4 | inf |" in table and "| draft | steps=8 | n/a |" in table
    assert "± 0.0100 on 100 draws of its own" in table and "(+0.1000, frontier_offset)" in table


def test_the_sampler_offset_is_the_untouched_samplers_own_error():
    """Measured on its own draws: on the quadratic well the 50-step sampler scores above the
    exact reference (its discretisation), by more than its standard error."""
    base = {**BASE, "reward": "quadratic", "num_steps": 50}
    curve, offset = gmm2d_frontier(base)
    assert curve[0].kl < 1e-9 and offset.samples == 65_536
    assert offset.value > 3 * offset.se and offset.se < 0.03


def test_the_frontier_plot_takes_a_log_kl_axis_only_when_the_kls_span_decades():
    from sqdf.experiments.frontier import kl_axis_threshold

    assert kl_axis_threshold([0.0, 0.05, 1.2, 3.1]) is None  # within two decades: linear
    assert kl_axis_threshold([]) is None and kl_axis_threshold([0.0]) is None
    assert kl_axis_threshold([0.0, 0.09, 1.1, 86893.5]) == 0.09  # DRaFT beside SQDF


def test_compare_runs_an_sd_preset_from_flags_alone(tmp_path):
    """sqdf compare --preset sd15-aesthetic with the weights as flags, no TOML file: a
    trained variant and best-of-N on the preset's settings and the given parts (tiny random
    SD parts; every method takes the same settings path, and two keep the test short)."""
    from sqdf.tasks.sd_random import write_parts

    parts = write_parts(tmp_path / "parts")
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red apple\n")
    out = tmp_path / "c"
    methods = ["sqdf", "best_of_n"]
    argv = ["compare", "--preset", "sd15-aesthetic", "--methods", ",".join(methods),
            "--steps", "1", "--seeds", "1", "--best-of", "2", "--out", str(out),
            "--model", parts["model"], "--task-param", f"lcm={parts['lcm']}",
            "--task-param", f"eval_prompts={prompts}", "--prompts", "varied",
            "--reward-param", f"clip={parts['clip']}", "--reward-param", f"head={parts['head']}",
            "--set", "num_steps=2", "--set", "batch_size=2", "--set", "grad_accum=1",
            "--set", "buffer_size=4", "--set", "fresh_trajectories=2",
            "--set", "device='cpu'", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["task"] == "sd"
    assert [r["variant"] for r in doc["runs"]] == methods
    assert not any("diverged" in r for r in doc["runs"])
    for method in methods[:-1]:  # each trained variant: the preset's values and the flags'
        (run,) = (out / "runs").glob(f"{method}-seed0")
        cfg = json.loads((run / "config.json").read_text())["train"]
        assert cfg["reward"] == "aesthetic" and cfg["task_params"]["lora_rank"] == 4
        assert cfg["task_params"]["model"] == parts["model"]
        assert cfg["reward_params"]["head"] == parts["head"]
        assert cfg["steps"] == 1 and cfg["method"] == method
