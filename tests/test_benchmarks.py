"""The benchmark scripts run and write what they say (their numbers are not checked here:
speed is measured on purpose, never asserted)."""

import importlib.util
import json
from pathlib import Path

import pytest

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
            "--num-steps", "4", "--batch-size", "2",
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
    argv = ["--task", "digits", "--updates", "3", "--designs", "reference,truncated_x2,replay2",
            "--eval-samples", "4", "--num-steps", "4", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    doc = json.loads(out.read_text())
    ref, trunc, replay = doc["results"]
    assert [r["design"] for r in doc["results"]] == ["reference", "truncated_x2", "replay2"]
    assert trunc["settings"] == {"rollout": "truncated", "buffer": "on_policy",
        "replay_ratio": 1, "batch_size": 16, "cells_per_trajectory": 2}  # fmt: skip
    assert replay["settings"]["replay_ratio"] == 2 and replay["settings"]["batch_size"] == 32
    assert [r["timed_updates"] for r in doc["results"]] == [2, 2, 2]
    assert all(r["s_per_update"] > 0 and r["peak_memory_gib"] > 0 for r in doc["results"])
    # both sample in their timed updates (replay2 at update 3 of 3, the reference at each);
    # which spends the larger share of its time sampling is a timing, not checked here
    assert 0 < replay["sampling_share"] < 1 and 0 < ref["sampling_share"] < 1
    assert "| truncated_x2 |" in capsys.readouterr().out


def test_update_speed_names_a_bad_design(capsys):
    bench = load("update_speed")
    with pytest.raises(SystemExit) as stop:
        bench.main(["--designs", "reference,replay0"])
    assert stop.value.code == 2
    assert "unknown design 'replay0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # 32 cells per update cannot come 3 per trajectory
        bench.main(["--designs", "reference,truncated_x3"])
    assert "design 'truncated_x3': its steps per trajectory must divide the batch (32)" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):  # replay8 is timed over whole cycles of 8 updates
        bench.main(["--designs", "reference,replay8", "--updates", "8"])
    assert "--updates must be >= 9" in capsys.readouterr().err


def test_the_flow_stage_runs_on_tiny_sd3_parts(tmp_path):
    """gpu_checks.sh's flow stage, on the tiny SD 3 parts: the flow kernel and Tweedie's x̂0
    through both benchmarks."""
    step = load("step_memory")
    argv = ["--preset", "tiny-sd3", "--parts", str(tmp_path / "parts"), "--batch-size", "2",
            "--out", str(tmp_path / "step.json")]  # fmt: skip
    assert step.main(argv) == 0
    assert json.loads((tmp_path / "step.json").read_text())["loss_finite"]
    speed = load("update_speed")
    # one design (a process each): replay4 samples and replays; the reference design's
    # process is test_update_speed_times_sd_without_scoring's
    argv = ["--task", "sd", "--preset", "tiny-sd3", "--parts", str(tmp_path / "parts"),
            "--batch-size", "2", "--designs", "replay4", "--updates", "5",
            "--num-steps", "4", "--eval-samples", "0",
            "--out", str(tmp_path / "speed.json")]  # fmt: skip
    assert speed.main(argv) == 0
    (result,) = json.loads((tmp_path / "speed.json").read_text())["results"]
    assert result["design"] == "replay4" and 0 < result["sampling_share"] < 1


def test_the_flux_stage_runs_on_tiny_flux_parts(tmp_path):
    """gpu_checks.sh's flux stage, on the tiny FLUX.1-dev-like parts: the packed transformer
    with its guidance input, the flow kernel and Tweedie's x̂0 through both benchmarks, at
    two (batch, side) sizes as the stage's two."""
    parts = str(tmp_path / "parts")
    step = load("step_memory")
    for batch, side in (2, 16), (1, 32):
        out = tmp_path / f"step-b{batch}-{side}px.json"
        argv = ["--preset", "tiny-flux", "--parts", parts, "--batch-size", str(batch),
                "--resolution", str(side), "--out", str(out)]  # fmt: skip
        assert step.main(argv) == 0
        doc = json.loads(out.read_text())
        assert doc["loss_finite"] and doc["task_params"]["resolution"] == side
    speed = load("update_speed")
    argv = ["--task", "sd", "--preset", "tiny-flux", "--parts", parts, "--batch-size", "2",
            "--designs", "replay4", "--updates", "5", "--num-steps", "4",
            "--eval-samples", "0", "--out", str(tmp_path / "speed.json")]  # fmt: skip
    assert speed.main(argv) == 0
    (result,) = json.loads((tmp_path / "speed.json").read_text())["results"]
    assert result["design"] == "replay4" and 0 < result["sampling_share"] < 1


def test_the_fluxdev_preset_has_flux1_dev_sizes():
    """The flux stage's parts, built on the meta device (shapes, no storage): FLUX.1-dev's
    11.9 B-parameter transformer in bfloat16, reading T5's 4096-wide states, CLIP-L's pooled
    768 and the VAE's 16 channels packed 2x2; the shallow T5 at T5-XXL's width and layer shape."""
    import torch

    from sqdf.tasks.sd_random import FLUX_PRESETS, PRESETS, fluxdev_parts

    assert "fluxdev" in FLUX_PRESETS and "fluxdev" in PRESETS
    parts = dict(fluxdev_parts(torch.device("meta")))
    assert list(parts) == ["transformer", "text_encoder_2", "text_encoder", "vae"]
    net, t5, clip, vae = parts.values()
    weights = list(net.parameters())
    assert {p.device.type for p in weights} == {"meta"}
    assert {p.dtype for p in weights} == {torch.bfloat16}
    assert sum(p.numel() for p in weights) == pytest.approx(11.9e9, rel=2e-3)  # FLUX.1-dev's
    assert len(net.transformer_blocks) == 19 and len(net.single_transformer_blocks) == 38
    assert net.config.guidance_embeds
    assert sum(net.config.axes_dims_rope) == net.config.attention_head_dim == 128
    assert net.config.joint_attention_dim == t5.config.d_model == 4096
    assert net.config.pooled_projection_dim == clip.config.hidden_size == 768
    assert net.config.in_channels == 4 * vae.config.latent_channels == 64
    assert vae.config.scaling_factor == 0.3611 and vae.config.shift_factor == 0.1159
    # T5-XXL's layer: 64 heads of 64, a gated-GELU feed-forward of 10240; 2 of its 24 layers
    assert (t5.config.num_heads, t5.config.d_kv, t5.config.d_ff) == (64, 64, 10240)
    assert t5.config.num_layers == 2 and {p.dtype for p in t5.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # building in bf16 left no trace


def test_step_memory_times_one_gradient_step(tmp_path, capsys):
    bench = load("step_memory")
    out = tmp_path / "step.json"
    argv = ["--preset", "tiny", "--parts", str(tmp_path / "parts"), "--batch-size", "2",
            "--step", "3", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["loss_finite"] and doc["step_s"] > 0 and doc["batch_size"] == 2
    assert doc["peak_gib"] >= doc["after_loading_gib"] > 0
    # the traced estimate of the same step (float32 on the CPU) is written beside it
    assert 0 < doc["traced_step_peak_gib"] < doc["peak_gib"]  # RSS holds more than tensors
    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--parts", str(tmp_path / "parts"), "--step", "50"])
    assert "--step must be in [0, 49], got 50" in capsys.readouterr().err
    posterior = ["--set", "estimator=gaussian_posterior", "--set", "q_cov=isotropic",
                 "--set", "q_draws=2"]  # fmt: skip
    assert bench.main([*argv, *posterior]) == 0
    doc = json.loads(out.read_text())
    assert doc["loss_finite"] and doc["settings"]["q_cov"] == "isotropic"
    assert doc["estimator"] == "gaussian_posterior"
    assert "traced_step_peak_gib" not in doc  # an estimator the trace does not follow
    with pytest.raises(SystemExit):
        bench.main([*argv, "--set", "q_cov=diagonal"])
    assert "unknown q_cov 'diagonal'" in capsys.readouterr().err


def test_buffer_memory_measures_every_store_and_dtype(tmp_path, capsys):
    bench = load("buffer_memory")
    out = tmp_path / "buffer.json"
    argv = ["--shapes", "sd15", "--trajectories", "2", "--steps", "2", "--dir", str(tmp_path),
            "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["states"] == 3 and len(doc["results"]) == 6
    by = {(r["store"], r["dtype"]): r for r in doc["results"]}
    states = 3 * 4 * 64 * 64  # values per trajectory
    assert by["memory", "float32"]["host_bytes_per_trajectory"] >= states * 4
    assert by["disk", "float32"]["host_bytes_per_trajectory"] < states
    assert by["disk", "bfloat16"]["disk_reserved_per_trajectory"] >= 2 * states * 2
    assert "| SD 1.5 at 512 px | 4x64x64 | disk | bfloat16 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "sd3"])
    assert "unknown shape 'sd3'" in capsys.readouterr().err


def test_posterior_trace_reads_the_probes_error(tmp_path, capsys):
    bench = load("posterior_trace")
    out = tmp_path / "trace.json"
    assert bench.main(["--samples", "2", "--steps", "30", "--repeats", "3", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["step"] == 30 and row["states"] == 2 and 0 <= row["negative_traces"] <= 2
    assert 0 < row["one_probe_rel_std_min"] <= row["one_probe_rel_std_median"]
    with pytest.raises(SystemExit):
        bench.main(["--steps", "49"])
    assert "--steps must lie in [0, 48] (got 49)" in capsys.readouterr().err


def test_posterior_gradient_compares_each_estimators_gradient_with_the_exact_one(tmp_path):
    bench = load("posterior_gradient")
    out = tmp_path / "grad.json"
    argv = ["--samples", "8", "--steps", "20,45", "--probes", "2", "--draws", "4", "--out",
            str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["command"] == " ".join(["python", "benchmarks/posterior_gradient.py", *argv])
    got = doc["rows"]
    rows = {(r["reward"], r["estimator"]): r for r in got if r["step"] == 20}
    assert {e for _, e in rows} == {"tweedie", "full", "isotropic-2", "isotropic_grad-2"}
    assert all(r["grad_rel_error"] > 0 for r in rows.values())
    # near the end the posterior is narrow: every estimator's gradient is the exact one's
    late = [r["grad_rel_error"] for r in got if r["step"] == 45]
    assert len(late) == 8 and max(late) < 0.1, late
    # a linear reward's log-mean-exp about the mean, its spread held fixed, has Tweedie's
    # gradient; keeping the trace's gradient moves it
    lin = {e: rows["linear", e]["grad_rel_error"] for e in ("tweedie", "isotropic-2",
                                                           "isotropic_grad-2")}  # fmt: skip
    assert lin["isotropic-2"] == lin["tweedie"] != lin["isotropic_grad-2"]


def test_flops_memory_tabulates_ratios_and_the_projected_8bit_base(tmp_path, capsys):
    bench = load("flops_memory")
    row = {
        "model": "fluxdev", "resolution": 1024, "batch": 1, "checkpointing": True,
        "flops_total": {"replay1": 2e12, "replay4": 1e12, "truncated": 3e12, "reference": 8e12},
        "traced_peak_bytes": 30 * 2**30, "denoiser_linear_bytes": 20 * 2**30,
        "weight_bytes": {"denoiser": 22 * 2**30, "VAE decoder": 2**30},
        "text_encoder_bytes": 9 * 2**30,
    }  # fmt: skip
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"rows": [row]}))
    assert bench.main(["--markdown", str(path)]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    # peak, peak minus half the Linear weights, weights, reference / sqdf, the TFLOP columns
    assert cells[4:9] == ["30.0 GiB", "20.0 GiB", "23.0 GiB", "1/4.0", "2"]
    assert cells[-1] == "9.0 GiB"
    with pytest.raises(SystemExit):
        bench.main(["--models", "sd9"])
