"""The command line: help, bad input as one line with status 2, and a full train/eval/sample."""

import json
import subprocess
import sys

import pytest

from sqdf.cli import main

TINY = [
    "--num-steps",
    "8",
    "--steps",
    "4",
    "--batch-size",
    "8",
    "--buffer-size",
    "16",
    "--device",
    "cpu",
    "--no-progress",
    "--task-param",
    "hidden=8",
]


@pytest.mark.parametrize("command", ["train", "eval", "sample"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: sqdf " + command in capsys.readouterr().out


def test_train_help_reuses_config_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "KL weight alpha" in out and "--reward-param" in out and "--resume" in out


def test_train_help_lists_every_task_parameter(capsys):
    import dataclasses

    from sqdf.tasks.digits import DigitsConfig
    from sqdf.tasks.gmm2d import GMM2DConfig
    from sqdf.tasks.sd import SDConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    section = out[out.index("task parameters") :].split("A TOML config")[0].splitlines()[1:]
    entries: dict[str, list[str]] = {}
    task = ""
    for line in section:  # "  TASK    k1, k2," then continuation lines
        if line.startswith("  ") and not line.startswith("   "):
            task, line = line.split(maxsplit=1)
        entries.setdefault(task, []).extend(k for k in line.replace(",", " ").split() if k)
    for name, cls in (("gmm2d", GMM2DConfig), ("digits", DigitsConfig), ("sd", SDConfig)):
        assert entries[name] == [f.name for f in dataclasses.fields(cls)], name


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--task", "imagenet"], "unknown task 'imagenet'"),
        (["train", "--method", "ppo"], "unknown method 'ppo'"),
        (["train", "--alpha", "-1"], "alpha must be >= 0, got -1.0"),
        (["train", "--gamma", "0"], "gamma must be in (0, 1], got 0.0"),
        (["train", "--gamma", "1.5"], "gamma must be in (0, 1], got 1.5"),
        (["train", "--reward", "beauty"], "unknown reward 'beauty'"),
        (["train", "--reward-param", "b"], "--reward-param expects KEY=VALUE"),
        (["train", "--task-param", "radiu=2"], "unknown parameter 'radiu' for task 'gmm2d'"),
        (["train", "--alpha", "two"], "invalid float value: 'two'"),
        (["eval", "no/such/run"], "run folder not found: no/such/run"),
        (["sample", "no/such/run"], "run folder not found: no/such/run"),
    ],
)
def test_bad_input_is_one_line_and_status_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) if message.startswith("invalid") else _no_raise():
        code = main(args)
        assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_foreign_folder_and_unknown_config_key(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"lr": 1}))
    assert main(["eval", str(foreign)]) == 2
    assert "not an sqdf run folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(empty)]) == 2
    assert "no config.json" in capsys.readouterr().err
    toml = tmp_path / "c.toml"
    toml.write_text("alpha = 1.0\nlearning_rate = 0.1\n")
    assert main(["train", "--config", str(toml)]) == 2
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("alpha = = 1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_train_eval_sample_resume(tmp_path, capsys):
    run = tmp_path / "run"
    toml = tmp_path / "c.toml"
    toml.write_text("alpha = 1.5\n[reward_params]\nb = [0.0, 1.0]\n")
    assert main(["train", "--config", str(toml), "--out", str(run), *TINY]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["alpha"] == 1.5 and saved["train"]["reward_params"] == {"b": [0.0, 1.0]}
    assert main(["train", "--resume", str(run), "--steps", "6", "--no-progress"]) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 6
    assert main(["eval", str(run), "--num-samples", "64"]) == 0
    assert json.loads((run / "eval.json").read_text())["num_samples"] == 64
    assert main(["sample", str(run), "--num-samples", "32"]) == 0
    assert (run / "samples.png").exists() and (run / "samples.safetensors").exists()
    assert main(["train", "--resume", str(run), "--alpha", "3", "--no-progress"]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_console_script_exit_status_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sqdf.cli", "train", "--gamma", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "sqdf train: error: gamma must be in (0, 1], got 2.0"


def test_eval_takes_the_runs_settings_flags_over_its_config(tmp_path, capsys):
    """--reward-param without NAME. is the run's own reward's, over its config.json: with
    b = 0 the linear reward b.x is 0 for every sample, policy and reference alike."""
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--num-steps", "3", "--steps", "1", "--batch-size",
            "2", "--buffer-size", "4", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert main(["eval", str(run), "--num-samples", "64", "--reward-param", "b=[0.0, 0.0]"]) == 0
    doc = json.loads((run / "eval.json").read_text())
    assert doc["reward_mean"] == 0.0 and doc["ref_reward_mean"] == 0.0
    # what was measured is not the run as trained: eval.json and the output say so
    assert doc["overrides"] == {"reward_params": {"b": [0.0, 0.0]}}
    note = "note: measured with settings over the run's own: reward_params.b=[0.0, 0.0]"
    assert note in capsys.readouterr().out.splitlines()
    assert json.loads((run / "config.json").read_text())["train"]["reward_params"] == {}
    assert main(["eval", str(run), "--num-samples", "64"]) == 0  # the run's own b = (1, 0)
    doc = json.loads((run / "eval.json").read_text())
    assert doc["reward_mean"] != 0.0 and "overrides" not in doc
    assert "note:" not in capsys.readouterr().out


def test_eval_takes_a_mixture_parts_own_parameters(tmp_path):
    """--reward-param NAME.KEY=VALUE, NAME a part of the run's own mixture, is that part's
    parameter (as train spells it), not a --rewards reward's: with both b = 0 the mixture
    scores 0 for every sample."""
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--reward", "linear#a=1,linear#b=0.5", "--num-steps",
            "3", "--steps", "1", "--batch-size", "2", "--buffer-size", "4", "--device", "cpu",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    zero = ["--reward-param", "linear#a.b=[0.0, 0.0]", "--reward-param", "linear#b.b=[0.0, 0.0]"]
    assert main(["eval", str(run), "--num-samples", "64", *zero]) == 0
    doc = json.loads((run / "eval.json").read_text())
    assert doc["reward_mean"] == 0.0 and doc["ref_reward_mean"] == 0.0
    assert main(["eval", str(run), "--num-samples", "64"]) == 0  # the run's own b = (1, 0)
    assert json.loads((run / "eval.json").read_text())["reward_mean"] != 0.0


def test_gmm2d_refuses_a_reward_without_a_closed_form_optimum(tmp_path, capsys):
    """gmm2d measures against the exact tilted optimum: a mixture that has none (linear plus
    quadratic) is refused in one line before training, not a traceback in sample or eval."""
    argv = ["train", "--out", str(tmp_path / "run"), "--reward", "linear=1,quadratic=1",
            "--num-steps", "3", "--steps", "1", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "closed-form optimum" in err, err
    assert not (tmp_path / "run" / "final").exists()


def test_eval_md_says_which_settings_were_taken_over_the_runs_own():
    from sqdf.evaluation.heldout import eval_markdown

    metrics = {"num_prompts": 1, "prompts": "animals", "images_per_prompt": 2, "seed": 0,
               "weights": "final", "diversity_features": "clip", "num_samples": 2,
               "rewards": {"aesthetic": {"trained": True, "ref_mean": 5.0, "mean": 6.0}},
               "ref_eval_diversity": 0.5, "eval_diversity": 0.4, "kl_path": 1.0,
               "frechet_to_reference": 0.1,
               "per_prompt": []}  # fmt: skip
    assert "over the run's own" not in eval_markdown(metrics, "t")
    metrics["overrides"] = {"task_params": {"guidance": 2.0}}
    page = eval_markdown(metrics, "t")
    assert "measured with settings over the run's own: task_params.guidance=2.0." in page


def test_sd_render_takes_guidance_and_steps_from_the_flags_and_the_preset(monkeypatch):
    """sample --task sd passes the guidance and steps it is given (--task-param, or a preset's)
    on to the render, and leaves the rest to the --lora run when none is given."""
    import sqdf.evaluation.render

    seen = []

    def render(model, lora, prompts, out, **kwargs):
        seen.append((model, prompts, kwargs["guidance"], kwargs["num_steps"]))
        return out

    monkeypatch.setattr(sqdf.evaluation.render, "render_sd", render)
    base = ["sample", "--task", "sd", "--model", "m", "--device", "cpu"]
    assert main([*base, "--task-param", "guidance=2.5", "--num-steps", "7"]) == 0
    assert main(base) == 0  # nothing given: the --lora run's settings, or the render's defaults
    assert main(["sample", "--preset", "sd35m-aesthetic", "--model", "m"]) == 0
    assert seen == [("m", None, 2.5, 7), ("m", None, None, None), ("m", "animals", 7.0, 28)]
