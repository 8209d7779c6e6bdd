"""ImageReward against the image-reward package's own scoring (``ImageReward.score`` on PIL
images, through its torchvision transform), on a tiny random model of the package's own
classes: its ImageReward with its BLIP VisionTransformer made 64 wide and 2 deep (ViT-L: 1024
and 24) and a one-layer BERT from a med_config written here; the same state dict loaded
through our reward scores the same pixels in torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sqdf.errors import ConfigError
from sqdf.rewards import build_reward
from sqdf.rewards.clip_rewards import CLIP_MEAN, CLIP_STD
from sqdf.rewards.image_reward import blip_tokenizer, image_reward_module
from tests.rewards.hub_cache import offline_hub_cache
from tests.tasks.sd_runs import write_tiny_parts
from tests.tasks.test_sd import directional_check

pytest.importorskip("fairscale")  # what BLIP's vit.py imports (the imagereward extra)
try:
    image_reward = image_reward_module()
except ImportError:  # the image-reward package is not installed (scripts/setup.sh installs it)
    pytest.skip("image-reward is not installed", allow_module_level=True)
blip_pretrain = sys.modules["ImageReward.models.BLIP.blip_pretrain"]
VisionTransformer = sys.modules["ImageReward.models.BLIP.vit"].VisionTransformer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "fox", "in", "the", "snow",
         "light", "##house", "at", "dusk", "bowl", "of", "ram", "##en", "on", "hill"]  # fmt: skip
# BLIP's med_config.json at one layer; hidden_size stays 768, the width ImageReward's MLP takes
MED = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
    "intermediate_size": 64, "layer_norm_eps": 1e-12, "max_position_embeddings": 64,
    "model_type": "bert", "num_attention_heads": 4, "num_hidden_layers": 1, "pad_token_id": 0,
    "type_vocab_size": 2, "vocab_size": len(VOCAB) + 2, "encoder_width": 64,
    "add_cross_attention": True,
}  # fmt: skip
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen on a hill"]
LONG = " ".join(["a red fox in the snow"] * 8)  # 48 tokens: cut to ImageReward's 35


def tiny_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
    """The package's create_vit at a tiny size: its VisionTransformer, with the drop path its
    'large' gets (0.1), which only eval mode turns off."""
    return VisionTransformer(img_size=image_size, patch_size=16, embed_dim=64, depth=2,
                             num_heads=2, drop_path_rate=0.1), 64  # fmt: skip


@pytest.fixture(autouse=True)
def tiny_vision(monkeypatch):
    monkeypatch.setattr(blip_pretrain, "create_vit", tiny_vit)


def write_tiny_image_reward(root) -> tuple:
    """(the package's model of one random init, in eval mode as ImageReward.load leaves it,
    and our reward's params) with its state dict, med_config and vocabulary under ``root``."""
    (root / "bert").mkdir()
    (root / "bert" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (root / "med_config.json").write_text(json.dumps(MED))
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(blip_pretrain, "create_vit", tiny_vit)
        m.setattr(blip_pretrain, "init_tokenizer", lambda: blip_tokenizer(root / "bert"))
        model = image_reward.ImageReward(med_config=str(root / "med_config.json"))
    # the package's MLP init (std 1/769, no activations) puts every score at -mean/std;
    # weights of unit gain make the tiny model's scores differ from image to image
    with torch.no_grad():
        for layer in model.mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, layer.in_features**-0.5)
                layer.bias.normal_(0, 0.1)
    torch.save(model.state_dict(), root / "ImageReward.pt")
    params = {"checkpoint": str(root / "ImageReward.pt"),
              "med_config": str(root / "med_config.json"),
              "tokenizer": str(root / "bert")}  # fmt: skip
    return model.eval(), params


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_image_reward(tmp_path_factory.mktemp("imagereward"))


def smooth_uint8(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """(n, h, w, 3) uint8 images of smooth random colour (8×8 noise, upsampled)."""
    coarse = torch.rand((n, 3, 8, 8), generator=torch.Generator().manual_seed(seed))
    fine = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")
    return (fine * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def ours_and_theirs(tiny, pixels: np.ndarray, prompts: list[str]):
    model, params = tiny
    reward = build_reward("imagereward", params)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        ours = reward(images, prompts)
        theirs = [model.score(p, Image.fromarray(x)) for p, x in zip(prompts, pixels, strict=True)]
    return ours, torch.tensor(theirs)


def test_scores_match_the_package_at_its_own_size(tiny):
    # 224 px: PIL's resize and crop are identities there, as are ours, so the pixels agree
    # exactly and only float summation order differs (a batch here, one image there)
    pixels = np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    prompts = [*PROMPTS, LONG]
    ours, theirs = ours_and_theirs(tiny, pixels, prompts)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert theirs.max() - theirs.min() > 0.1  # far above the tolerance: the images are told apart


def test_scores_match_the_package_after_resizing(tiny):
    # 256×320 -> 224×280 -> crop 224: PIL resizes uint8 pixels with its antialiased bicubic and
    # rounds them to 1/255, torch resizes floats with its own (the same kernel): pixels differ
    # by about 1/255 at most, which moves the tiny model's score by under 3e-4, against a
    # spread of about 0.15 between these images
    pixels = smooth_uint8(3, 256, 320, seed=1)
    ours, theirs = ours_and_theirs(tiny, pixels, PROMPTS)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=3e-4)
    assert theirs.max() - theirs.min() > 0.05


def test_the_package_preprocesses_as_we_do(tiny):
    resize, crop, _, _, normalize = tiny[0].preprocess.transforms
    assert (resize.size, resize.interpolation.value, crop.size) == (224, "bicubic", (224, 224))
    assert (tuple(normalize.mean), tuple(normalize.std)) == (CLIP_MEAN, CLIP_STD)


def test_gradient_in_the_images_is_finite_nonzero_and_right(tiny):
    reward = build_reward("imagereward", tiny[1])
    images = torch.rand((2, 3, 40, 48), generator=torch.Generator().manual_seed(2)) * 0.8 + 0.1
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reward(x, PROMPTS[:2]).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    directional_check(reward, images, PROMPTS[:2])


def test_tokenizer_is_berts_with_blips_two_tokens(tiny):
    from transformers import BertTokenizer

    folder = tiny[1]["tokenizer"]
    ours, plain = blip_tokenizer(folder), BertTokenizer.from_pretrained(folder)
    assert ours(PROMPTS).input_ids == plain(PROMPTS).input_ids
    assert ours.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(VOCAB), len(VOCAB) + 1]
    assert ours.bos_token == "[DEC]" and ours.enc_token_id == len(VOCAB) + 1


def test_masked_image_tokens_are_ignored_by_the_cross_attention(tiny):
    # invert_attention_mask, which transformers 5 dropped and we lend BLIP's BertModel: image
    # tokens masked out count for as little as image tokens that are not there
    bert = tiny[0].blip.text_encoder
    text = tiny[0].blip.tokenizer(PROMPTS[:2], padding="max_length", max_length=12,
                                  return_tensors="pt")  # fmt: skip
    image = torch.randn((2, 10, 64), generator=torch.Generator().manual_seed(3))
    mask = torch.ones((2, 10), dtype=torch.long)
    mask[:, 6:] = 0
    with torch.no_grad():
        kw = {"attention_mask": text.attention_mask, "return_dict": True}
        masked = bert(text.input_ids, encoder_hidden_states=image, encoder_attention_mask=mask,
                      **kw).last_hidden_state  # fmt: skip
        dropped = bert(text.input_ids, encoder_hidden_states=image[:, :6],
                       encoder_attention_mask=mask[:, :6], **kw).last_hidden_state  # fmt: skip
        ones = torch.ones_like(mask)
        whole = bert(text.input_ids, encoder_hidden_states=image, encoder_attention_mask=ones,
                     **kw).last_hidden_state  # fmt: skip
    torch.testing.assert_close(masked, dropped, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(masked, whole, atol=1e-3)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("checkpoint", "/no/ImageReward.pt", "checkpoint='/no/ImageReward.pt' not found"),
        ("med_config", "/no/med.json", "med_config='/no/med.json' not found"),
        ("tokenizer", "/no/bert", "has no vocab.txt"),
    ],
)  # fmt: skip
def test_missing_files_are_one_line(tiny, key, value, message):
    with pytest.raises(ConfigError) as info:
        build_reward("imagereward", {**tiny[1], key: value})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_without_paths_the_files_come_from_the_hub_cache(tiny, tmp_path, monkeypatch):
    from sqdf.rewards.image_reward import HUB_REPO, TOKENIZER_REPO

    params = tiny[1]
    files = {HUB_REPO: {"ImageReward.pt": Path(params["checkpoint"]),
                        "med_config.json": Path(params["med_config"])},
             TOKENIZER_REPO: {"vocab.txt": Path(params["tokenizer"]) / "vocab.txt"}}  # fmt: skip
    offline_hub_cache(tmp_path / "hub", monkeypatch, files)
    pixels = smooth_uint8(2, 224, 224, seed=7)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        given = build_reward("imagereward", params)(images, PROMPTS[:2])
        default = build_reward("imagereward", {})(images, PROMPTS[:2])
    torch.testing.assert_close(default, given)
    # a repository not in the offline cache is one line naming it and HF_HUB_OFFLINE
    offline_hub_cache(tmp_path / "empty", monkeypatch, {})
    with pytest.raises(ConfigError) as info:
        build_reward("imagereward", {}).model  # noqa: B018
    message = str(info.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message
    assert "THUDM/ImageReward/ImageReward.pt is not in the Hub cache" in message


def test_a_torn_checkpoint_is_one_line(tiny, tmp_path):
    torn = tmp_path / "torn.pt"
    torn.write_bytes(Path(tiny[1]["checkpoint"]).read_bytes()[:500])  # a download cut short
    with pytest.raises(ConfigError) as info:
        build_reward("imagereward", {**tiny[1], "checkpoint": str(torn)}).model  # noqa: B018
    assert "cannot read" in str(info.value) and "\n" not in str(info.value)


def test_a_checkpoint_of_another_model_is_refused(tiny, tmp_path):
    state = torch.load(tiny[1]["checkpoint"], weights_only=True)
    cases = [
        ({k: v for k, v in state.items() if not k.startswith("mlp.")},
         r"lacks 10 of the model's weights \(e.g. mlp\.layers\.0\.weight\)"),
        ({**state, "mlp.layers.0.weight": torch.zeros(3, 3)},
         "does not fit the model of med_config.json: size mismatch for mlp.layers.0.weight"),
    ]  # fmt: skip
    for i, (bad, message) in enumerate(cases):
        torch.save(bad, tmp_path / f"{i}.pt")
        reward = build_reward("imagereward", {**tiny[1], "checkpoint": str(tmp_path / f"{i}.pt")})
        with pytest.raises(ConfigError, match=message) as info:
            reward.to("cpu")  # the model is loaded when first used
        assert "\n" not in str(info.value)


def test_without_the_package_the_error_names_the_extra(tiny, monkeypatch):
    monkeypatch.delitem(sys.modules, "ImageReward.ImageReward")
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # as if it were not installed
    with pytest.raises(ConfigError) as info:
        build_reward("imagereward", tiny[1])
    message = str(info.value)
    assert "needs the image-reward package (not installed)" in message and "\n" not in message
    assert "pip install 'sqdf[imagereward]' && pip install --no-deps 'image-reward==1.5'" in message


def test_two_updates_of_sd_on_imagereward_from_the_cli(tiny, tmp_path_factory):
    from safetensors.torch import load_file

    from sqdf.cli import main

    parts = write_tiny_parts(tmp_path_factory.mktemp("sd"))
    run = tmp_path_factory.mktemp("run") / "run"
    argv = ["train", "--task", "sd", "--model", str(parts / "sd"), "--prompts", "varied",
            "--reward", "imagereward", "--estimator", "tweedie", "--num-steps", "3",
            "--steps", "2", "--batch-size", "2", "--buffer-size", "8",
            "--grad-accum", "1", "--lr", "1e-2", "--device", "cpu", "--out", str(run),
            "--no-progress"]  # fmt: skip
    for key, value in tiny[1].items():
        argv += ["--reward-param", f"{key}={value}"]
    assert main(argv) == 0
    config = json.loads((run / "config.json").read_text())["train"]
    assert config["reward"] == "imagereward" and config["reward_params"] == tiny[1]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged and all(np.isfinite(m["reward_mean"]) for m in logged if "reward_mean" in m)
    final = load_file(str(run / "final" / "policy.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in final.items() if "lora_B" in k)
