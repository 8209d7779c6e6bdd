"""HPSv2 / HPSv2.1 against the authors' own scoring code (the hpsv2x package's
``hpsv2.img_score.score``), on a tiny random open_clip model of the class it builds: the same
state dict through their PIL pipeline and through our differentiable torch one."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sqdf.errors import ConfigError
from sqdf.rewards import build_reward
from sqdf.rewards.clip_rewards import HPS_COMMIT, HPS_FILES, HPS_REPO
from tests.rewards.hub_cache import offline_hub_cache

pytest.importorskip("open_clip")
hps_score = pytest.importorskip("hpsv2.img_score")

ARCH = "tiny-hps"  # registered with both open_clips below; ViT-H-14's tokenizer and text length
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "patch_size": 32,
                   "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 2},
}  # fmt: skip
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen"]


def write_tiny_hps(root) -> tuple:
    """A random HPS model of ``ARCH`` made by the hpsv2 package's own factory, with the
    arguments its ``initialize_model`` passes but no pretrained tower, and its state dict
    saved as ``root/hps.pt``: (their model, their evaluation transform, the file)."""
    import open_clip
    from hpsv2.src import open_clip as their_open_clip

    config = root / f"{ARCH}.json"
    config.write_text(json.dumps(TINY))
    open_clip.add_model_config(config)
    their_open_clip.add_model_config(config)
    torch.manual_seed(0)
    model, _, preprocess_val = their_open_clip.create_model_and_transforms(
        ARCH, None, precision="fp32", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None,
        pretrained_image=False, image_mean=None, image_std=None, light_augmentation=True,
        aug_cfg={}, output_dict=True, with_score_predictor=False, with_region_predictor=False,
    )  # fmt: skip
    checkpoint = root / "hps.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return model, preprocess_val, checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(their model and evaluation transform, our checkpoint file) of one random init."""
    return write_tiny_hps(tmp_path_factory.mktemp("hps"))


def their_scores(tiny, monkeypatch, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """hpsv2's own score() of uint8 images, one prompt at a time as it takes them."""
    model, preprocess_val, checkpoint = tiny
    monkeypatch.setattr(hps_score, "model_dict", {"model": model, "preprocess_val": preprocess_val})
    out = []
    for image, prompt in zip(images, prompts, strict=True):
        array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        (value,) = hps_score.score([Image.fromarray(array)], prompt, cp=str(checkpoint))
        out.append(float(np.asarray(value)))
    return torch.tensor(out)


def uint8_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Images whose pixels are exact in uint8, so PIL sees what the torch pipeline sees."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255


def ours(tiny, **params):
    return build_reward("hpsv2", {"checkpoint": str(tiny[2]), "arch": ARCH, **params})


def test_scores_equal_the_hpsv2_package_at_the_models_size(tiny, monkeypatch):
    images = uint8_images(3, 224, 224, seed=1)
    torch.testing.assert_close(
        ours(tiny)(images, PROMPTS), their_scores(tiny, monkeypatch, images, PROMPTS),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip


def test_other_sizes_are_resized_and_padded_as_the_package_does(tiny, monkeypatch):
    # a wide image, and a tall one larger than the model's size: longer side to 224, the
    # shorter padded with black, no crop. hpsv2's transform resizes the tensor ToTensor made
    # (torchvision's antialiased bicubic), as ours does; a crop, or a resize without antialias,
    # misses by 5e-4 or more. The long prompt is cut at 77 tokens on both sides.
    long = " ".join(["a red fox in the snow"] * 20)
    for size, prompts in (((96, 160), PROMPTS), ((320, 240), [long, *PROMPTS[1:]])):
        images = uint8_images(3, *size, seed=2)
        theirs = their_scores(tiny, monkeypatch, images, prompts)
        torch.testing.assert_close(ours(tiny)(images, prompts), theirs, rtol=0, atol=1e-5)


def test_the_reward_has_the_images_gradient(tiny):
    reward = ours(tiny)
    images = (uint8_images(2, 64, 64, seed=3) * 0.8 + 0.1).requires_grad_(True)
    value = reward(images, PROMPTS[:2])
    (grad,) = torch.autograd.grad(value.sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    direction = torch.randn_like(images)
    eps = 1e-3
    with torch.no_grad():
        fd = (reward(images + eps * direction, PROMPTS[:2]).sum()
              - reward(images - eps * direction, PROMPTS[:2]).sum()) / (2 * eps)  # fmt: skip
    torch.testing.assert_close((grad * direction).sum(), fd, rtol=2e-2, atol=1e-5)


@pytest.mark.parametrize("version", ["v2.0", "v2.1"])
def test_without_a_checkpoint_the_versions_hub_file_is_read_from_the_cache(
    tiny, tmp_path, monkeypatch, version
):
    cached = {f"{HPS_REPO}@{HPS_COMMIT}": {HPS_FILES[version]: tiny[2]}}
    offline_hub_cache(tmp_path / "hub", monkeypatch, cached)
    images = uint8_images(2, 224, 224, seed=4)
    reward = build_reward("hpsv2", {"version": version, "arch": ARCH})
    torch.testing.assert_close(reward(images, PROMPTS[:2]), ours(tiny)(images, PROMPTS[:2]))
    other = "v2.1" if version == "v2.0" else "v2.0"  # the other version's file is not cached
    with pytest.raises(ConfigError) as err:
        build_reward("hpsv2", {"version": other, "arch": ARCH})(images, PROMPTS[:2])
    message = str(err.value)
    assert "\n" not in message and HPS_REPO in message and HPS_FILES[other] in message
    assert "HF_HUB_OFFLINE" in message


def test_bad_settings_are_one_line(tiny, tmp_path, monkeypatch):
    cases = [
        ({"version": "v3"}, "version='v3' is not one of v2.0, v2.1"),
        ({"checkpoint": str(tmp_path / "none.pt")}, "checkpoint file not found"),
        ({"arch": "ViT-Q-99"}, "arch='ViT-Q-99' is not an open_clip model"),
    ]
    for params, match in cases:
        with pytest.raises(ConfigError, match=match):
            build_reward("hpsv2", {"arch": ARCH, **params})
    junk = tmp_path / "junk.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(2)}}, junk)
    with pytest.raises(ConfigError, match="is not an HPS tiny-hps state dict"):
        build_reward("hpsv2", {"checkpoint": str(junk), "arch": ARCH})(
            uint8_images(1, 32, 32, seed=5), PROMPTS[:1]
        )
    torn = tmp_path / "torn.pt"
    torn.write_bytes(tiny[2].read_bytes()[:500])  # a download cut short
    with pytest.raises(ConfigError, match="cannot read .*torn.pt as a state dict") as err:
        build_reward("hpsv2", {"checkpoint": str(torn), "arch": ARCH})(
            uint8_images(1, 32, 32, seed=5), PROMPTS[:1]
        )
    assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ConfigError, match=r"pip install 'sqdf\[hpsv2\]'"):
        build_reward("hpsv2", {"checkpoint": str(tiny[2])})


def test_sqdf_trains_on_hpsv2_with_tiny_sd_parts(tiny, tmp_path):
    from sqdf.cli import main
    from sqdf.run.folder import read_metrics
    from sqdf.tasks.sd_random import write_random_sd

    model = write_random_sd(tmp_path / "sd")
    run = tmp_path / "run"
    code = main([
        "train", "--task", "sd", "--task-param", f"model={model}", "--reward", "hpsv2",
        "--reward-param", f"checkpoint={tiny[2]}", "--reward-param", f"arch={ARCH}",
        "--num-steps", "3", "--steps", "2", "--batch-size", "2", "--buffer-size", "4",
        "--estimator", "tweedie", "--lr", "1e-2", "--device", "cpu", "--no-progress",
        "--out", str(run),
    ])  # fmt: skip
    assert code == 0
    rows = read_metrics(run)
    # the first update's policy equals the reference, so its gradient is the reward's alone
    assert rows[0]["grad_norm"] > 0 and all(np.isfinite(r["reward_mean"]) for r in rows)
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["reward"] == "hpsv2" and resolved["reward_params"]["version"] == "v2.0"


def test_checkpointing_keeps_the_value_and_the_gradient(tiny):
    images = uint8_images(2, 64, 64, seed=6)
    out = []
    for checkpointed in (False, True):
        reward = ours(tiny)
        if checkpointed:
            reward.enable_checkpointing()
            assert reward._parts[0].transformer.grad_checkpointing
        x = images.clone().requires_grad_(True)
        value = reward(x, PROMPTS[:2])
        (grad,) = torch.autograd.grad(value.sum(), x)
        out.append((value.detach(), grad))
    torch.testing.assert_close(out[1][0], out[0][0])
    torch.testing.assert_close(out[1][1], out[0][1])
