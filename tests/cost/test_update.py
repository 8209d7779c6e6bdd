"""One update's trace on a tiny SD 1.5-shaped model (configs only, meta tensors): each phase
against an independent count of the network it runs (FlopCounterMode on a direct call), the
composition of designs against its closed form, and the memory levers in the direction
they must move."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sqdf.config.train_config import TrainConfig
from sqdf.cost.parts import meta_sd_task
from sqdf.cost.trace import fused_attention
from sqdf.cost.update import (
    expected_steps,
    gpu_peak,
    trace_update,
    update_flops,
)
from sqdf.tasks.lora import adapters_disabled
from tests.cost.conftest import TINY_CLIP

HEAD = [16, 8, 1]


def _cfg(model: Path, **over) -> TrainConfig:
    params = {"model": str(model), "resolution": 32, **over.pop("task_params", {})}
    values = dict(task="sd", estimator="tweedie", batch_size=2, num_steps=10, reward="aesthetic",
                  task_params=params)  # fmt: skip
    return TrainConfig(**(values | over))


def _direct_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, fused_attention():
        fn()
    return counter.get_total_flops()


def test_phases_count_the_networks_they_run(model):
    cfg = _cfg(model)
    meta = meta_sd_task(cfg, TINY_CLIP, HEAD)
    traces = trace_update(meta, cfg, batch=2)
    net, vae, task = meta.task.denoiser, meta.task.vae, meta.task
    # CFG: the denoiser on both halves, 2B = 4 rows, as the task batches them
    x = torch.zeros(4, *task.sample_shape, device="meta", dtype=task.dtype)
    t = torch.zeros(4, device="meta")
    text = torch.zeros(4, 77, 32, device="meta", dtype=task.dtype)
    with torch.no_grad():
        policy = _direct_flops(lambda: net(x, t, encoder_hidden_states=text))
        with adapters_disabled(net):
            reference = _direct_flops(lambda: net(x, t, encoder_hidden_states=text))
        decode = _direct_flops(lambda: vae.decode(x[:2]))
    assert reference < policy  # the LoRA's products
    assert traces.flops["sampling"] == policy
    assert traces.flops["policy step"] == policy
    assert traces.flops["reference step"] == reference
    assert traces.flops["x̂0 model"] == reference  # Tweedie: the reference with CFG again
    assert traces.flops["VAE decode"] == decode
    assert traces.flops["scoring fresh"] == decode + traces.flops["reward"]
    # backward: at least the input gradients of every network the loss ran through
    assert traces.flops["backward"] > policy + reference + decode
    assert gpu_peak(traces) == traces.peak + 16 * meta.trainable
    assert traces.peak > traces.weights


def test_checkpointing_trades_flops_for_memory(model):
    on, off = (_cfg(model, task_params={"gradient_checkpointing": v}) for v in (True, False))
    traced_on = trace_update(meta_sd_task(on, TINY_CLIP, HEAD), on, batch=4)
    traced_off = trace_update(meta_sd_task(off, TINY_CLIP, HEAD), off, batch=4)
    assert traced_on.peak < traced_off.peak
    assert traced_on.flops["backward"] > traced_off.flops["backward"]  # the recomputation
    assert traced_on.flops["policy step"] == traced_off.flops["policy step"]


def test_a_larger_batch_costs_more_memory_and_proportionally_more_flops(model):
    cfg = _cfg(model)
    small = trace_update(meta_sd_task(cfg, TINY_CLIP, HEAD), cfg, batch=2)
    large = trace_update(meta_sd_task(cfg, TINY_CLIP, HEAD), cfg, batch=4)
    assert large.peak > small.peak
    for phase in ("sampling", "policy step", "VAE decode"):
        assert large.flops[phase] == 2 * small.flops[phase]


def test_expected_steps_of_a_truncated_trajectory_by_enumeration():
    for T, m in ((5, 1), (6, 2), (7, 3)):
        draws = list(itertools.combinations(range(T), m))
        brute = sum(max(d) for d in draws) / len(draws)
        assert expected_steps(T, m) == pytest.approx(brute)


def test_designs_compose_the_traced_pieces(model):
    cfg = _cfg(model, grad_accum=3)
    traces = trace_update(meta_sd_task(cfg, TINY_CLIP, HEAD), cfg, batch=2)
    per = {k: v / 2 for k, v in traces.flops.items()}
    b, T, accum = 2, 10, 3
    ref, rep4, trunc = (update_flops(traces, cfg, d) for d in ("reference", "replay4", "truncated"))
    # the official trainer samples B x grad_accum trajectories an update, sqdf's B every N
    assert ref["sampling"] == pytest.approx(per["sampling"] * b * accum * T)
    assert ref["scoring fresh"] == pytest.approx(per["scoring fresh"] * b * accum)
    assert rep4["sampling"] == pytest.approx(per["sampling"] * b * T / 4)
    assert rep4["scoring fresh"] == pytest.approx(per["scoring fresh"] * b / 4)
    assert trunc["sampling"] == pytest.approx(per["sampling"] * accum * b * (T - 1) / 2)
    assert trunc["scoring fresh"] == 0
    for phase in ("policy step", "backward", "reward"):
        assert ref[phase] == rep4[phase] == trunc[phase] == pytest.approx(per[phase] * b * accum)
    with pytest.raises(ValueError, match="unknown design"):
        update_flops(traces, cfg, "nonsense")


def test_replay_sampling_counts_the_trajectories_the_trainer_samples(model, monkeypatch):
    """Sampling FLOPs of an update = (trajectories sqdf.training.fresh.sample_scored samples every
    replay_ratio updates) x T steps x one step's FLOPs / replay_ratio, with the samples counted
    by calling the trainer's own sampling loop, fresh_trajectories set apart from the batch."""
    from types import SimpleNamespace

    import sqdf.training.fresh as fresh
    from sqdf.sampling.sampler import Trajectories

    cfg = _cfg(model, batch_size=2, grad_accum=4, fresh_trajectories=8, replay_ratio=2,
               buffer_size=16)  # fmt: skip
    sampled: list[int] = []

    def counting(task, n, generator, **kw):  # noqa: ANN001, ANN003
        sampled.append(n)
        return Trajectories(torch.zeros(n, cfg.num_steps + 1, 1), torch.zeros(n), None)

    monkeypatch.setattr(fresh, "sample_trajectories", counting)
    task = SimpleNamespace(device="cpu", reward_with_parts=lambda x, c: (torch.zeros(len(x)), {}))
    run = SimpleNamespace(cfg=cfg, task=task, generator=None, method_params={})
    fresh.sample_scored(run)
    traces = trace_update(meta_sd_task(cfg, TINY_CLIP, HEAD), cfg, batch=2)
    step = traces.flops["sampling"] / 2  # one sampling step of one trajectory
    ours = update_flops(traces, cfg, "replay2")
    assert ours["sampling"] == pytest.approx(sum(sampled) * cfg.num_steps * step / 2)
    assert ours["scoring fresh"] == pytest.approx(
        sum(sampled) * traces.flops["scoring fresh"] / 2 / 2
    )
    # the reference design: the official budget, B x grad_accum trajectories every update
    ref = update_flops(traces, cfg, "reference")
    assert ref["sampling"] == pytest.approx(2 * 4 * cfg.num_steps * step)


def test_the_vae_is_traced_in_float32_where_the_task_upcasts_it(tmp_path):
    """A float16 SDXL-family run decodes in float32 (the task's rule, SDXL's VAE overflows
    float16): the traced VAE holds float32 weights and its decode reads float32 latents;
    bfloat16 and an SD 1.5-family float16 run keep the compute dtype."""
    from sqdf.tasks.sd_random import write_random_sd

    xl = write_random_sd(tmp_path / "xl", "tiny-xl")
    sd = write_random_sd(tmp_path / "sd", "tiny")

    def vae_dtype(folder, dtype):
        cfg = _cfg(folder, task_params={"dtype": dtype})
        return next(meta_sd_task(cfg, TINY_CLIP, HEAD).task.vae.parameters()).dtype

    assert vae_dtype(xl, "float16") == torch.float32
    assert vae_dtype(xl, "bfloat16") == torch.bfloat16
    assert vae_dtype(sd, "float16") == torch.float16
    cfg = _cfg(xl, task_params={"dtype": "float16"})
    meta = meta_sd_task(cfg, TINY_CLIP, HEAD)
    traces = trace_update(meta, cfg, batch=2)
    vae = meta.task.vae
    assert traces.parts["VAE decoder"] == 4 * sum(p.numel() for p in vae.parameters())


def test_a_grpo_update_counts_the_passes_it_is_built_from(model):
    """GRPO's update against an independent count: FlopCounterMode over the policy's guided
    pass with gradients, its backward alone, and the reference's guided pass; composed as
    the trainer runs it (fresh_count trajectories of T sampled steps and one scoring every
    replay_ratio updates, grad_accum micro-batches of B cells)."""
    cfg = _cfg(model, method="grpo", buffer="on_policy", grad_accum=3,
               method_params={"group_size": 2})  # fmt: skip
    meta = meta_sd_task(cfg, TINY_CLIP, HEAD)
    traces = trace_update(meta, cfg, batch=2)
    net, task = meta.task.denoiser, meta.task
    x = torch.zeros(4, *task.sample_shape, device="meta", dtype=task.dtype)  # CFG: 2B rows
    t = torch.zeros(4, device="meta")
    text = torch.zeros(4, 77, 32, device="meta", dtype=task.dtype)
    with adapters_disabled(net), torch.no_grad():
        reference = _direct_flops(lambda: net(x, t, encoder_hidden_states=text))
    with FlopCounterMode(display=False) as counter, fused_attention():
        out = net(x, t, encoder_hidden_states=text).sample
        policy = counter.get_total_flops()
        out.float().sum().backward()
    backward = counter.get_total_flops() - policy
    for p in net.parameters():
        p.grad = None
    assert traces.phases() == ("sampling", "scoring fresh", "policy step", "reference step",
                               "backward")  # fmt: skip
    assert traces.flops["policy step"] == policy
    assert traces.flops["reference step"] == reference
    assert traces.flops["backward"] == backward  # through the policy's pass alone
    b, T, accum = 2, cfg.num_steps, 3
    flops = update_flops(traces, cfg, "replay1")
    # fresh_count = B trajectories of T steps, each step the guided pass per trajectory
    assert flops["sampling"] == pytest.approx(b * T * policy / b)
    assert flops["policy step"] + flops["reference step"] + flops["backward"] == pytest.approx(
        accum * (policy + reference + backward)
    )
    assert "x̂0 model" not in flops and "VAE decode" not in flops


def test_chain_methods_charge_their_own_chain_and_random_draws_in_expectation(model):
    """AlignProp's truncation k ~ U{1..T}: in expectation k steps with gradients (each the
    policy's guided pass, as many FLOPs as a sampling step's) after T - k steps of its own
    chain without them; its memory at k = T, past the traces at 1 and 2 steps."""
    cfg = _cfg(model, method="alignprop")
    traces = trace_update(meta_sd_task(cfg, TINY_CLIP, HEAD), cfg, batch=2)
    step, T = traces.flops["sampling"], cfg.num_steps
    mean_k = (1 + T) / 2
    assert traces.flops["policy step"] == pytest.approx(mean_k * step)
    assert traces.flops["chain without gradient"] == pytest.approx((T - mean_k) * step)
    assert traces.peak > max(traces.phase_peak.values())  # the line's, at k = T
    assert "memory at k = 10" in traces.note


def test_flux_schnell_is_traced_with_its_own_256_t5_tokens(tmp_path):
    # FLUX.1-dev reads 512 T5 tokens, schnell 256: alone, and as dev's x̂0 network
    from sqdf.tasks.sd_random import write_random_flux

    write_random_flux(tmp_path / "dev")
    write_random_flux(tmp_path / "schnell", guidance_embeds=False)

    def traced(model: str, **params) -> object:
        task_params = {"resolution": 16, "guidance": 1.0} if model == "schnell" else {}
        cfg = _cfg(tmp_path / model, task_params=task_params | params, num_steps=4,
                   estimator="consistency" if params else "tweedie")  # fmt: skip
        meta = meta_sd_task(cfg, TINY_CLIP, HEAD)
        assert trace_update(meta, cfg, batch=1).peak > 0
        return meta.task

    schnell = traced("schnell")
    assert schnell.text.embeds.shape[1] == 256 and schnell.distilled_text is None
    assert traced("dev").text.embeds.shape[1] == 512
    task = traced("dev", lcm=str(tmp_path / "schnell"))  # its pipeline's folder, as runs take it
    assert task.text.embeds.shape[1] == 512 and task.distilled_text.embeds.shape[1] == 256
