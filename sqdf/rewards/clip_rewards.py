"""Image-text rewards on CLIP features: LAION aesthetic, PickScore, CLIP score (local
transformers folders), and HPSv2 / HPSv2.1 (open_clip, an optional extra). They score images
in [0, 1], (B, 3, H, W), for the prompts (a list of B strings), and are differentiable in the
images.

Preprocessing stays in torch (resize, centre crop, normalise), so the reward's gradient
reaches the pixels with no PIL round trip. The CLIP weights are frozen; they are kept in
train mode only so gradient checkpointing (which transformers applies in training) can cut
their activation memory: CLIP has no dropout, so train mode computes the same function.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sqdf.errors import ConfigError, SqdfError
from sqdf.infra.weights import (
    as_safetensors,
    parse_hub_ref,
    planning_now,
    read_torch_weights,
    resolve,
)

# OpenAI CLIP's preprocessing, used when a folder has no preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224


def clip_preprocess(images: Tensor, size: int, mean: tuple, std: tuple) -> Tensor:
    """[0, 1] images -> CLIP input: shorter side resized to ``size`` (bicubic, antialiased),
    centre crop, normalised. Differentiable."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


# the default weights (docs/weights.md): Hub references, resolved through sqdf.infra.weights
# the CLIP of the LAION aesthetic head
CLIP_L14 = "openai/clip-vit-large-patch14@32bd64288804d66eefd0ccbe215aa642df71cc41"
# the LAION improved aesthetic predictor's sac+logos+ava1-l14-linearMSE head, as TRL's DDPO
# example fetches it (trl-lib/ddpo-aesthetic-predictor, aesthetic-model.pth)
AESTHETIC_HEAD = (
    "trl-lib/ddpo-aesthetic-predictor@cf4bd10345610935a80a5d3be9a3133c50f121e4/aesthetic-model.pth"
)
PICKSCORE = "yuvalkirstain/PickScore_v1@a4e4367c6dfa7288a00c550414478f865b875800"
# PickScore's tokenizer and image preprocessing: its authors' processor
PICKSCORE_PROCESSOR = (
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K@1c2b8495b28150b8a4922ee1c8edee224c284c0c"
)


def _need_folder(path: str | None, reward: str, key: str) -> Path:
    if not path:
        raise ConfigError(
            f"reward {reward!r} needs {key}=FOLDER (a transformers CLIP model: a local folder "
            "or a Hub reference)"
        )
    folder = Path(resolve(path, f"reward {reward!r} {key}"))
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"reward {reward!r}: {key}={path!r} is not a model folder (no config.json)"
        )
    return folder


class ClipModel:
    """A frozen transformers CLIPModel with its tokenizer and preprocessing, on one device."""

    def __init__(
        self, folder: Path, device: torch.device | str = "cpu", processor: Path | None = None
    ):
        """``processor``: the folder of its tokenizer and preprocessor config where they are
        not beside the weights (PickScore's are its base CLIP's)."""
        from transformers import CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True
        ).to(device)
        self.model.requires_grad_(False)
        self.model.train()  # see the module docstring: checkpointing only acts in train mode
        processor = processor or folder
        self.tokenizer = CLIPTokenizer.from_pretrained(str(processor), local_files_only=True)
        size, mean, std = CLIP_SIZE, CLIP_MEAN, CLIP_STD
        pre = processor / "preprocessor_config.json"
        if pre.is_file():
            conf = json.loads(pre.read_text())
            crop = conf.get("crop_size", size)
            size = crop.get("height", size) if isinstance(crop, dict) else crop
            mean, std = tuple(conf.get("image_mean", mean)), tuple(conf.get("image_std", std))
        self.size, self.mean, self.std = int(size), mean, std
        self._text_cache: dict[str, Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def enable_checkpointing(self) -> None:
        enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5
        (enable or self.model.gradient_checkpointing_enable)()

    def image_features(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings, (B, D)."""
        pixels = clip_preprocess(images.to(self.device), self.size, self.mean, self.std)
        feats = self.model.get_image_features(pixel_values=pixels.to(self.model.dtype))
        feats = feats if isinstance(feats, Tensor) else feats.pooler_output
        return F.normalize(feats.float(), dim=-1)

    def text_features(self, prompts: list[str]) -> Tensor:
        """L2-normalised text embeddings, (B, D); each distinct prompt is encoded once."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if new:
            tokens = self.tokenizer(
                new, padding="max_length", truncation=True, return_tensors="pt",
                max_length=self.tokenizer.model_max_length,
            )  # fmt: skip
            with torch.no_grad():
                feats = self.model.get_text_features(
                    input_ids=tokens.input_ids.to(self.device),
                    attention_mask=tokens.attention_mask.to(self.device),
                )
            feats = feats if isinstance(feats, Tensor) else feats.pooler_output
            for p, f in zip(new, F.normalize(feats.float(), dim=-1), strict=True):
                self._text_cache[p] = f
        return torch.stack([self._text_cache[p] for p in prompts])


def _prompts(prompts: Any, n: int, reward: str) -> list[str]:
    if not isinstance(prompts, (list, tuple)) or len(prompts) != n:
        raise SqdfError(f"reward {reward!r} scores images with their prompts (task sd)")
    return [str(p) for p in prompts]


def load_linear_head(path: str | Path) -> list[tuple[Tensor, Tensor]]:
    """The aesthetic head's layers as (weight, bias) pairs in order, from safetensors keys
    ``layers.<i>.weight`` / ``layers.<i>.bias`` (the LAION head is a stack of linear maps
    with dropout between them and no activation)."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"aesthetic head file not found: {path}")
    tensors = load_file(str(path))
    index = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("layers.")})
    layers = []
    for i in index:
        w, b = tensors.get(f"layers.{i}.weight"), tensors.get(f"layers.{i}.bias")
        if w is None or b is None or w.dim() != 2:
            raise ConfigError(f"aesthetic head {path}: layer {i} is not a linear layer")
        layers.append((w.float(), b.float()))
    if not layers or layers[-1][0].shape[0] != 1:
        raise ConfigError(f"aesthetic head {path}: expected linear layers ending in one output")
    for (w1, _), (w2, _) in zip(layers, layers[1:], strict=False):
        if w2.shape[1] != w1.shape[0]:
            raise ConfigError(f"aesthetic head {path}: layer sizes do not chain")
    return layers


def convert_aesthetic_head(pth: str | Path, out: str | Path) -> Path:
    """The public LAION head (a torch state dict, .pth) -> safetensors, loaded with
    weights_only=True so the file cannot run code."""
    from safetensors.torch import save_file

    source = str(pth)
    state = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(k.startswith("layers.") for k in state):
        raise SqdfError(f"{pth} is not an aesthetic-head state dict (no layers.* keys)")
    tensors = {k: v.contiguous() for k, v in state.items() if k.startswith("layers.")}
    save_file(tensors, str(out))
    load_linear_head(out)  # the result must read back as a head
    return Path(out)


@dataclass
class AestheticReward:
    """LAION aesthetic predictor: its linear head on normalised CLIP ViT-L/14 image features."""

    clip: str = CLIP_L14  # CLIP ViT-L/14: a local folder or a Hub reference
    # the head: safetensors, or the public torch state dict (.pth, converted once into sqdf's
    # cache); a local file or a Hub reference
    head: str = AESTHETIC_HEAD
    domain = "rgb"  # (B, 3, H, W) in [0, 1], with prompts: the sd task

    def __post_init__(self) -> None:
        self._folder = _need_folder(self.clip, "aesthetic", "clip")
        self.clip = str(self._folder)
        if not self.head:
            raise ConfigError("reward 'aesthetic' needs head=FILE (a local file or Hub reference)")
        given = self.head
        head = resolve(given, "reward 'aesthetic' head")
        if planning_now():
            self._layers = []  # a dry run lists the head; it loads nothing
            return
        self.head = as_safetensors(
            head, convert_aesthetic_head, "reward 'aesthetic' head", given=given
        )
        self._layers = load_linear_head(self.head)

    @cached_property
    def clip_model(self) -> ClipModel:
        return ClipModel(self._folder)

    def enable_checkpointing(self) -> None:
        self.clip_model.enable_checkpointing()

    def to(self, device: torch.device) -> AestheticReward:
        self.clip_model.model.to(device)
        self._layers = [(w.to(device), b.to(device)) for w, b in self._layers]
        return self

    def __call__(self, images: Tensor, prompts: Any = None) -> Tensor:
        x = self.clip_model.image_features(images)
        if x.shape[1] != self._layers[0][0].shape[1]:
            raise SqdfError(
                f"aesthetic head expects {self._layers[0][0].shape[1]}-d features, the CLIP "
                f"model gives {x.shape[1]}"
            )
        for w, b in self._layers:
            x = F.linear(x, w, b)
        return x.squeeze(1)


@dataclass
class _PromptClipReward:
    """A CLIP model from a folder scoring an image against its prompt."""

    model: str | None = None  # the CLIP model: a local folder or a Hub reference
    domain = "rgb"  # (B, 3, H, W) in [0, 1], with prompts: the sd task
    name = ""

    def __post_init__(self) -> None:
        self._folder = _need_folder(self.model, self.name, "model")
        self.model = str(self._folder)
        self._processor: Path | None = None

    @cached_property
    def clip_model(self) -> ClipModel:
        return ClipModel(self._folder, processor=self._processor)

    def enable_checkpointing(self) -> None:
        self.clip_model.enable_checkpointing()

    def to(self, device: torch.device) -> _PromptClipReward:
        self.clip_model.model.to(device)
        return self

    def cosine(self, images: Tensor, prompts: Any) -> Tensor:
        text = self.clip_model.text_features(_prompts(prompts, images.shape[0], self.name))
        return (self.clip_model.image_features(images) * text).sum(-1)


@dataclass
class PickScoreReward(_PromptClipReward):
    """PickScore: the CLIP logit scale times the cosine of image and prompt embeddings."""

    model: str | None = PICKSCORE
    # its tokenizer and preprocessing (PickScore_v1 holds the weights alone): a folder or a
    # Hub reference; "" reads them from model's folder
    processor: str = PICKSCORE_PROCESSOR
    name = "pickscore"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.processor:
            self._processor = Path(
                resolve(self.processor, "reward 'pickscore' processor", configs_only=True)
            )
            self.processor = str(self._processor)

    def __call__(self, images: Tensor, prompts: Any = None) -> Tensor:
        scale = self.clip_model.model.logit_scale.exp().float()
        return scale * self.cosine(images, prompts)


@dataclass
class ClipScoreReward(_PromptClipReward):
    """CLIP score: 100 × the cosine of image and prompt embeddings, floored at 0 (as in
    torchmetrics' CLIPScore)."""

    model: str | None = CLIP_L14  # torchmetrics' CLIPScore default
    name = "clipscore"

    def __call__(self, images: Tensor, prompts: Any = None) -> Tensor:
        return (100.0 * self.cosine(images, prompts)).clamp(min=0.0)


# HPSv2's weights: the Hub repository its authors' hpsv2 package downloads from, and the file of
# each version (hpsv2/utils.py, ``hps_version_map``). The official SQDF code trains on v2.0.
HPS_REPO = "xswu/HPSv2"
HPS_COMMIT = "697403c78157020a1ae59d23f111aa58ced35b0a"  # docs/weights.md
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def hps_preprocess(images: Tensor, size: int, mean: tuple, std: tuple) -> Tensor:
    """[0, 1] images -> HPSv2's input, as its evaluation transform makes it (hpsv2's
    ``ResizeMaxSize``): the longer side resized to ``size`` (bicubic, antialiased), the shorter
    padded with black on both sides to a square, no crop; then normalised. Differentiable."""
    h, w = images.shape[-2:]
    x = images
    if max(h, w) != size:
        scale = size / max(h, w)
        nh, nw = round(h * scale), round(w * scale)
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        ph, pw = size - nh, size - nw
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


@dataclass
class HPSv2Reward:
    """Human Preference Score v2 / v2.1 (Wu et al., 2023): the cosine of an open_clip
    ViT-H-14's image and prompt embeddings, fine-tuned on human preferences, built as the
    authors' hpsv2 package builds it (``hpsv2.img_score.score``; tested against it). Needs
    the optional extra: ``pip install 'sqdf[hpsv2]'`` (open_clip).

    ``checkpoint`` is the state dict (read with weights_only=True); without it, ``version``'s
    file is taken from the Hub repository ``xswu/HPSv2`` through the Hub cache."""

    checkpoint: str | None = None  # HPS state dict (.pt), local or Hub; default: version's file
    version: str = "v2.0"  # v2.0 (HPS_v2_compressed.pt, the SQDF paper's) or v2.1
    arch: str = "ViT-H-14"  # the open_clip architecture the checkpoint is of
    domain = "rgb"  # (B, 3, H, W) in [0, 1], with prompts: the sd task

    def __post_init__(self) -> None:
        if self.version not in HPS_FILES:
            raise ConfigError(
                f"reward 'hpsv2': version={self.version!r} is not one of {', '.join(HPS_FILES)}"
            )
        try:
            import open_clip
        except ImportError:
            raise ConfigError(
                "reward 'hpsv2' needs the optional extra: pip install 'sqdf[hpsv2]' (open_clip)"
            ) from None
        if self.arch not in open_clip.list_models():
            raise ConfigError(f"reward 'hpsv2': arch={self.arch!r} is not an open_clip model")
        if self.checkpoint:
            local = Path(self.checkpoint).expanduser()
            if parse_hub_ref(self.checkpoint) is None and not local.is_file():
                raise ConfigError(f"reward 'hpsv2': checkpoint file not found: {self.checkpoint}")
        # resolved now (a dry run lists it, a run records it); loaded when first scored
        self.checkpoint = resolve(
            self.checkpoint or f"{HPS_REPO}@{HPS_COMMIT}/{HPS_FILES[self.version]}",
            "reward 'hpsv2'",
        )

    @cached_property
    def _parts(self) -> tuple[Any, Any]:
        import open_clip

        path = self.checkpoint
        model = open_clip.create_model(self.arch, pretrained=None)
        state = read_torch_weights(path, "hpsv2")
        try:
            model.load_state_dict(state.get("state_dict", state))
        except (RuntimeError, AttributeError) as err:  # other keys or shapes; not a dict
            first = str(err).splitlines()[0]
            raise ConfigError(
                f"reward 'hpsv2': {path} is not an HPS {self.arch} state dict: {first}"
            ) from None
        model.requires_grad_(False)
        model.eval()  # no dropout in CLIP; eval as the hpsv2 package scores
        return model, open_clip.get_tokenizer(self.arch)

    def enable_checkpointing(self) -> None:
        """Recompute the ViT's blocks in the backward pass (open_clip's own switch)."""
        self._parts[0].set_grad_checkpointing(True)

    def to(self, device: torch.device) -> HPSv2Reward:
        self._parts[0].to(device)
        return self

    def __call__(self, images: Tensor, prompts: Any = None) -> Tensor:
        model, tokenizer = self._parts
        device = next(model.parameters()).device
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = getattr(model.visual, "image_mean", None) or CLIP_MEAN
        std = getattr(model.visual, "image_std", None) or CLIP_STD
        pixels = hps_preprocess(images.to(device).float(), int(size), mean, std)
        img = model.encode_image(pixels, normalize=True).float()
        tokens = tokenizer(_prompts(prompts, images.shape[0], "hpsv2")).to(device)
        with torch.no_grad():
            txt = model.encode_text(tokens, normalize=True).float()
        return (img * txt).sum(-1)
