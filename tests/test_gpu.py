"""The same runs on a CUDA device (skipped where there is none): catches CPU/GPU tensor mix-ups."""

import pytest
import torch

from sqdf import TrainConfig, evaluate_run, train
from sqdf.experiments.demo import run_demo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("estimator", ["tweedie", "consistency"])
@pytest.mark.parametrize("buffer", ["uniform", "prioritized"])
def test_gmm2d_on_gpu(tmp_path, estimator, buffer):
    cfg = TrainConfig(
        device="cuda",
        estimator=estimator,
        buffer=buffer,
        num_steps=10,
        steps=4,
        batch_size=16,
        buffer_size=32,
        checkpoint_every=2,
    )
    run = train(cfg, tmp_path / "run", progress=False)
    train(cfg.__class__(**{**cfg.to_dict(), "steps": 6}), run, resume=True, progress=False)
    assert evaluate_run(run, num_samples=64)["kl_path"] >= 0


@pytest.mark.parametrize("estimator", ["tweedie", "consistency"])
def test_digits_and_demo_on_gpu(tmp_path, estimator):
    page = run_demo(
        tmp_path / "demo",
        num_samples=16,
        progress=False,
        quality_samples=8,
        steps=2,
        num_steps=6,
        batch_size=4,
        buffer_size=8,
        device="cuda",
        estimator=estimator,
        checkpoint_every=0,
    )
    assert page.exists()


@pytest.mark.parametrize("lcm", ["unet", "lora"])
def test_sd_in_bfloat16_on_gpu(tmp_path, lcm):
    """Tiny SD parts in bf16 with checkpointing, both LCM kinds, truncated rollouts too; the
    LoRA trains in float32 and reloads into a plain pipeline."""
    from diffusers import StableDiffusionPipeline

    from sqdf.run.settings import make_config
    from sqdf.tasks.sd_random import write_parts, write_random_lcm_lora

    paths = write_parts(tmp_path / "parts", "tiny")
    lcm_path = paths["lcm"]
    if lcm == "lora":
        lcm_path = str(write_random_lcm_lora(paths["model"], tmp_path / "lcm_lora"))
    for rollout, buffer in (("full", "prioritized"), ("truncated", "on_policy")):
        cfg = make_config({
            "task": "sd", "device": "cuda", "estimator": "consistency", "num_steps": 6,
            "steps": 2, "batch_size": 2, "buffer": buffer, "buffer_size": 8, "rollout": rollout,
            "task_params": {"model": paths["model"], "lcm": lcm_path, "dtype": "bfloat16"},
            "reward_params": {"clip": paths["clip"], "head": paths["head"]},
        }, source="gpu test")  # fmt: skip
        run = train(cfg, tmp_path / f"run-{rollout}", progress=False)
        assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(paths["model"]).to("cuda")
    pipe.load_lora_weights(str(run / "final"))
    images = pipe("a cat", num_inference_steps=2, output_type="pt").images
    assert torch.isfinite(images).all()
