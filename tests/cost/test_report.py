"""The dry run's cost section: FLOPs and traced memory printed as estimates, the fit verdict
against --gpu-memory, and the settings that lower the peak when it does not fit."""

from __future__ import annotations

import re

import pytest

from sqdf.cli import main
from sqdf.config.train_config import TrainConfig
from sqdf.cost.memory import parse_memory
from sqdf.cost.report import RewardSwap, levers, trace_run, traced_reward_note
from sqdf.cost.update import gpu_peak
from sqdf.errors import ConfigError


def test_parse_memory_reads_binary_and_decimal_units():
    assert parse_memory("24GiB") == 24 * 2**30
    assert parse_memory("24 GB") == 24 * 10**9
    assert parse_memory("80") == 80 * 2**30
    assert parse_memory("512MiB") == 512 * 2**20
    for bad in ("lots", "0", "-3GiB", "24 TB"):
        with pytest.raises(ConfigError, match="--gpu-memory"):
            parse_memory(bad)


def _dry_run(model, capsys, *extra: str) -> str:
    argv = ["train", "--task", "sd", "--model", str(model), "--task-param", "resolution=32",
            "--estimator", "tweedie", "--dry-run", *extra]  # fmt: skip
    assert main(argv) == 0
    return capsys.readouterr().out


def _mib(out: str, label: str) -> float:
    return float(re.search(rf"{label}: ([0-9.]+) MiB", out)[1])


@pytest.fixture(scope="module")
def large_card(model) -> str:
    """The dry run's output against an 80 GiB card, traced once for the tests that read it."""
    import contextlib
    import io

    argv = ["train", "--task", "sd", "--model", str(model), "--task-param", "resolution=32",
            "--estimator", "tweedie", "--dry-run", "--gpu-memory", "80GiB"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(argv) == 0
    return printed.getvalue()


def test_dry_run_prints_flops_memory_and_fits_a_large_card(large_card):
    out = large_card
    assert "traced estimates, not measurements" in out
    assert "not seen: the CUDA context" in out
    for phase in ("sampling", "policy step", "reference step", "x̂0 model", "VAE decode",
                  "reward", "backward"):  # fmt: skip
        assert re.search(rf"^    {re.escape(phase)}\s+[0-9.]+ TFLOP\s+[0-9.]+ TFLOP$", out, re.M)
    # the task defaults: 4 fresh trajectories an update against the reference's 4 x 8
    ratio = float(re.search(r"this run: ([0-9.]+) of the reference design", out)[1])
    assert 0 < ratio < 1
    assert "fit: fits 80.00 GiB" in out


def test_dry_run_that_does_not_fit_lists_the_levers_in_order(model, capsys):
    out = _dry_run(model, capsys, "--gpu-memory", "1MiB")
    assert "fit: does not fit" in out
    assert out.index("vae_slicing=true") < out.index("--batch-size 2 --grad-accum 16")
    # the task defaults' batch 4 and fresh_trajectories 0: 4 fresh trajectories pinned
    first = out.index("--batch-size 2 --grad-accum 16 --fresh-trajectories 4 (same cells")
    second = out.index("--batch-size 1 --grad-accum 32 --fresh-trajectories 4 (same cells")
    assert first < second
    peaks = [float(v) for v in re.findall(r"fresh trajectories per update\): ([0-9.]+) MiB", out)]
    assert peaks[1] < peaks[0] < _mib(out, "peak of one update")


def test_levers_lower_the_traced_peak_and_keep_the_cells_per_update(model):
    cfg = TrainConfig(task="sd", estimator="tweedie", batch_size=4, grad_accum=2,
                      reward="aesthetic", task_params={"model": str(model), "resolution": 32,
                      "gradient_checkpointing": False})  # fmt: skip
    found = levers(cfg)
    flags = [flag for flag, _ in found]
    assert flags[0].startswith("--task-param vae_slicing=true")
    assert flags[1] == "--task-param gradient_checkpointing=true"
    peaks = [gpu_peak(trace_run(changed)) for _, changed in found[:4]]
    assert peaks[0] > peaks[1] > peaks[2] > peaks[3]  # slicing: the next test
    for _, changed in found[2:4]:
        assert changed.batch_size * changed.grad_accum == 8
        assert changed.fresh_count == cfg.fresh_count == 4  # the same fresh sampling
        assert changed.task_params["vae_slicing"] and changed.task_params["gradient_checkpointing"]


def test_vae_slicing_lowers_the_decode_peak_at_the_same_flops():
    """SD 1.5's VAE decoder at 512 px, batch 4, checkpointed as the task runs it: decoding
    and back-propagating one image at a time holds less at once, for the same products."""
    import torch
    from diffusers import AutoencoderKL

    from sqdf.cost.model_configs import read_shipped
    from sqdf.cost.parts import made_on_meta
    from sqdf.cost.trace import UpdateTracer, fused_attention

    traced = []
    for sliced in (False, True):
        with made_on_meta(torch.bfloat16):
            vae = AutoencoderKL.from_config(read_shipped("sd15")["components"]["vae"])
        del vae.encoder
        vae.requires_grad_(False).enable_gradient_checkpointing()
        if sliced:
            vae.enable_slicing()
        z = torch.zeros(4, 4, 64, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
        tracer = UpdateTracer()
        tracer.hold([*vae.parameters(), z])
        with tracer, fused_attention():
            vae.decode(z).sample.float().sum().backward()
        traced.append(tracer)
    whole, one_at_a_time = traced
    assert one_at_a_time.peak < whole.peak
    assert one_at_a_time.flops == whole.flops


def _native(model, tmp_path, side: int):
    """A copy of the tiny config-only folder whose denoiser's native image side is ``side``."""
    import json
    import shutil

    folder = tmp_path / f"native{side}"
    if not folder.exists():
        shutil.copytree(model, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["sample_size"] = side // 2  # the tiny VAE downsamples by 2
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    return folder


def test_resolution_levers_only_lower_the_native_side(model, tmp_path):
    """With no resolution set the run trains at the model's native side: a 512 px model is
    offered no resolution lever at or above 512, a 1024 px one 768 then 512."""

    def offered(folder, **params) -> list[int]:
        cfg = TrainConfig(task="sd", estimator="tweedie", batch_size=1, reward="aesthetic",
                          task_params={"model": str(folder), **params})  # fmt: skip
        return [changed.task_params["resolution"] for flag, changed in levers(cfg)
                if flag.startswith("--task-param resolution=")]  # fmt: skip

    assert offered(_native(model, tmp_path, 512)) == []
    assert offered(_native(model, tmp_path, 1024)) == [768, 512]
    assert offered(_native(model, tmp_path, 512), resolution=1024) == [768, 512]
    assert offered(_native(model, tmp_path, 1024), resolution=640) == [512]


def test_fit_verdict_keeps_headroom_for_what_the_trace_cannot_see(large_card):
    """A card 1 MiB above the traced peak does not fit: the CUDA context and the allocator's
    margin come on top of the traced tensors, and the verdict prints that headroom. (The
    printed verdicts of a card that fits and of one that does not: the tests above.)"""
    from sqdf.cost.memory import ALLOCATOR_MARGIN, CUDA_CONTEXT, fits, headroom

    out = large_card
    assert f"CUDA context {CUDA_CONTEXT / 2**20:.1f} MiB" in out
    peak = int(float(re.search(r"traced peak ([0-9.]+) MiB", out)[1]) * 2**20)
    assert not fits(peak, peak + 2**20)
    assert not fits(peak, peak + headroom(peak) - 2**20)
    assert fits(peak, peak + headroom(peak) + 2**20)
    assert headroom(10 * 2**30) == CUDA_CONTEXT + int(ALLOCATOR_MARGIN * 10 * 2**30)


def test_the_reward_traced_is_named_for_what_was_traced():
    # sqdf bbo's proxy reads its reward's CLIP; beside a reward without a shipped config
    # (PickScore's ViT-H/14) the trace's ViT-L/14 stands in, and the note says so
    proxy = RewardSwap("the BBO proxy", lambda reward: reward)
    aesthetic = TrainConfig(task="sd", reward="aesthetic")
    pick = TrainConfig(task="sd", reward="pickscore")
    assert traced_reward_note(aesthetic, None) == (
        "the aesthetic reward (CLIP ViT-L/14, shipped config)"
    )
    assert traced_reward_note(aesthetic, proxy) == (
        "the BBO proxy over the CLIP of the aesthetic reward (CLIP ViT-L/14, shipped config)"
    )
    assert traced_reward_note(pick, proxy) == (
        "the BBO proxy over CLIP ViT-L/14, standing in for the CLIP of reward 'pickscore'"
    )
    assert "aesthetic head" in traced_reward_note(pick, None)  # the head stands in too
    # sd's default reward, "auto", is the aesthetic one
    assert traced_reward_note(TrainConfig(task="sd"), proxy) == traced_reward_note(aesthetic, proxy)
