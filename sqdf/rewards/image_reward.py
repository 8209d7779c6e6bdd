"""ImageReward (Xu et al., 2023) as the image-reward package builds it: its own model class
``ImageReward.ImageReward.ImageReward`` (BLIP's ViT-L and its BERT with cross-attention to the
image, an MLP head, and the (head − mean) / std normalisation), scoring images in [0, 1],
(B, 3, H, W), for their prompts, differentiably in the images.

Importing that model here takes three steps around the package, each because of something it
cannot do in this environment, none of which touch the model's arithmetic:

- The package's ``__init__`` (and its ``models/__init__``) import its other scorers and ReFL,
  which need OpenAI's ``clip`` (through ``pkg_resources``, gone from setuptools 81) and
  ``datasets``. The reward needs neither, so ``ImageReward.ImageReward`` is imported with those
  two packages registered unrun; they are removed from ``sys.modules`` afterwards, so a later
  ``import ImageReward`` runs the real ones.
- BLIP's ``med.py`` was written against transformers 4. Under transformers 5 it imports three
  helpers from ``transformers.modeling_utils`` (two now live in ``transformers.pytorch_utils``;
  head pruning's is gone, and ImageReward never prunes), calls ``get_head_mask`` and
  ``invert_attention_mask`` (gone from ``PreTrainedModel``) and calls ``init_weights`` before
  ``post_init`` has recorded the tied weights (its BertModel ties none). The helpers are lent
  to ``modeling_utils`` only while med.py is imported; the two methods and the empty tied-weight
  map are added to med.py's BertModel only where transformers lacks them.
- BLIP's ``init_tokenizer`` fetches ``bert-base-uncased`` from the Hub and reads
  ``additional_special_tokens_ids`` (gone in transformers 5). While the model is built it is
  replaced by one that reads the local tokenizer folder and adds the same two tokens.

The package's import also sets transformers' log level and silences every warning; both are
put back as they were.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from sqdf.errors import ConfigError
from sqdf.infra.weights import hub_file, read_torch_weights, resolve
from sqdf.rewards.clip_rewards import CLIP_MEAN, CLIP_STD, _prompts, clip_preprocess

# where the official weights are: ImageReward's Hub repository (the package's utils.py downloads
# both files from it) and BLIP's BERT tokenizer
HUB_REPO = "THUDM/ImageReward"
TOKENIZER_REPO = "google-bert/bert-base-uncased"
# ImageReward is built for 224 px (its _transform(224): resize the shorter side, bicubic, centre
# crop, the CLIP mean/std) and tokenises prompts to 35 tokens (ImageReward.score)
IMAGE_SIZE = 224
PROMPT_TOKENS = 35
INSTALL = (
    "pip install 'sqdf[imagereward]' && pip install --no-deps 'image-reward==1.5' (its own "
    "timm==0.6.13 pin conflicts with open_clip's timm>=1.0.17)"
)


def _find_pruneable_heads_and_indices(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("head pruning is gone from transformers 5; ImageReward never prunes")


def _get_head_mask(self: Any, head_mask: Any, num_hidden_layers: int) -> list[None]:
    """transformers 4's ``get_head_mask`` for the only head mask ImageReward passes: none."""
    if head_mask is not None:
        raise NotImplementedError("BLIP's BertModel under transformers 5 takes no head_mask")
    return [None] * num_hidden_layers


def _invert_attention_mask(self: Any, mask: Tensor) -> Tensor:
    """transformers 4's ``invert_attention_mask``: a (B, N) or (B, M, N) mask of ones (attend)
    and zeros -> an additive mask broadcast over heads, 0 where attended, the dtype's minimum
    where not."""
    mask = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    mask = mask.to(self.dtype)
    return (1.0 - mask) * torch.finfo(self.dtype).min


@contextmanager
def _lent(module: Any, names: dict[str, Any]):
    """``module`` has each of ``names`` it lacks while the block runs."""
    added = [name for name in names if not hasattr(module, name)]
    for name in added:
        setattr(module, name, names[name])
    try:
        yield
    finally:
        for name in added:
            delattr(module, name)


@contextmanager
def _replaced(module: Any, name: str, value: Any):
    """``module.name`` is ``value`` while the block runs."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


@contextmanager
def _quiet_imports():
    """The package's imports silence all warnings and set transformers' log level; undo both."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm 1's aliases of timm 0.6 modules
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)


def image_reward_module() -> ModuleType:
    """``ImageReward.ImageReward`` imported as the module docstring says; ImportError (with the
    missing module's name) when the package or what it imports is not installed."""
    module = sys.modules.get("ImageReward.ImageReward")
    if module is None:
        module = _import_past_package_inits()
    med = sys.modules["ImageReward.models.BLIP.med"]
    for name, value in (
        ("get_head_mask", _get_head_mask),
        ("invert_attention_mask", _invert_attention_mask),
        ("all_tied_weights_keys", {}),
    ):
        if not hasattr(med.BertModel, name):
            setattr(med.BertModel, name, value)
    return module


def _import_past_package_inits() -> ModuleType:
    if "ImageReward" in sys.modules:  # the real package ran, or is recorded as absent
        return importlib.import_module("ImageReward.ImageReward")
    spec = importlib.util.find_spec("ImageReward")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("No module named 'ImageReward'", name="ImageReward")
    import transformers.modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    root = Path(spec.submodule_search_locations[0])
    unrun = {}
    for name, folder in (("ImageReward", root), ("ImageReward.models", root / "models")):
        init = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        unrun[name] = importlib.util.module_from_spec(init)
    helpers = {
        "apply_chunking_to_forward": pytorch_utils.apply_chunking_to_forward,
        "prune_linear_layer": pytorch_utils.prune_linear_layer,
        "find_pruneable_heads_and_indices": _find_pruneable_heads_and_indices,
    }
    sys.modules.update(unrun)
    try:
        with _quiet_imports(), _lent(transformers.modeling_utils, helpers):
            return importlib.import_module("ImageReward.ImageReward")
    finally:
        for name, shell in unrun.items():
            if sys.modules.get(name) is shell:
                del sys.modules[name]


def blip_tokenizer(folder: Path) -> Any:
    """BERT's tokenizer from ``folder`` with the two tokens BLIP's ``init_tokenizer`` adds:
    ``[DEC]`` as the beginning of sequence and ``[ENC]`` (ids len(vocab) and len(vocab) + 1,
    which the checkpoint's embedding rows 30522 and 30523 belong to)."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


def _local_file(path: str | None, key: str, what: str) -> Path | None:
    """A file the user named (None if none was: the Hub's is taken when the model loads)."""
    if not path:
        return None
    file = Path(resolve(path, f"reward 'imagereward' {key}"))  # local, or a Hub reference
    if not file.is_file():
        raise ConfigError(f"reward 'imagereward': {key}={path!r} not found; it is {what}")
    return file


@dataclass
class ImageRewardReward:
    """ImageReward, the image-reward package's model on three files, each a local path or,
    when not given, taken from the Hugging Face Hub through its cache when the model loads:

    - ``checkpoint``: ``ImageReward.pt``, the state dict, from the Hub repository
      ``THUDM/ImageReward`` (read with ``weights_only=True``);
    - ``med_config``: ``med_config.json`` from the same repository (BLIP's BERT settings);
    - ``tokenizer``: a folder with BERT's ``vocab.txt``, i.e. ``bert-base-uncased``
      (``google-bert/bert-base-uncased`` on the Hub), the tokenizer BLIP loads by that name.

    Needs ``pip install 'sqdf[imagereward]'`` (what BLIP's code imports: fairscale, timm) and
    then ``pip install --no-deps 'image-reward==1.5'``: that package pins timm==0.6.13, which
    pip can only satisfy by downgrading open_clip (the hpsv2 extra), and the reward uses none
    of the rest it declares. The score is the package's ``score_gard`` (its differentiable
    score, ReFL's): the head's output less 0.167, over 1.033. Preprocessing is its transform
    (shorter side to 224 px, bicubic, centre crop, CLIP mean/std) in torch with antialiasing,
    so the gradient reaches the pixels. The model runs in eval mode (BLIP's dropout and drop
    path off) with its weights frozen."""

    checkpoint: str | None = None  # ImageReward.pt (THUDM/ImageReward on the Hub)
    med_config: str | None = None  # med_config.json (THUDM/ImageReward on the Hub)
    tokenizer: str | None = None  # bert-base-uncased folder (vocab.txt)
    domain = "rgb"  # (B, 3, H, W) in [0, 1], with prompts: the sd task
    name = "imagereward"

    def __post_init__(self) -> None:
        try:
            image_reward_module()
        except ImportError as exc:
            missing = exc.name or str(exc)
            what = "not installed" if missing.startswith("ImageReward") else f"{missing} missing"
            raise ConfigError(
                f"reward 'imagereward' needs the image-reward package ({what}): {INSTALL}"
            ) from None
        hub = f"from the Hugging Face Hub repository {HUB_REPO}"
        self._checkpoint = _local_file(self.checkpoint, "checkpoint", f"ImageReward.pt {hub}")
        self._med_config = _local_file(self.med_config, "med_config", f"med_config.json {hub}")
        self._tokenizer = (
            Path(resolve(self.tokenizer, "reward 'imagereward' tokenizer"))
            if self.tokenizer
            else None
        )
        if self._tokenizer is not None and not (self._tokenizer / "vocab.txt").is_file():
            raise ConfigError(
                f"reward 'imagereward': tokenizer={self.tokenizer!r} has no vocab.txt (it is "
                f"bert-base-uncased's tokenizer folder, {TOKENIZER_REPO} on the Hub)"
            )

    def _files(self) -> tuple[Path, Path, Path]:
        """(checkpoint, med_config, tokenizer folder): each as given, else from the Hub."""
        checkpoint = self._checkpoint or Path(hub_file(HUB_REPO, "ImageReward.pt", self.name))
        med_config = self._med_config or Path(hub_file(HUB_REPO, "med_config.json", self.name))
        tokenizer = self._tokenizer or Path(hub_file(TOKENIZER_REPO, "vocab.txt", self.name)).parent
        return checkpoint, med_config, tokenizer

    @cached_property
    def model(self) -> Any:
        """The package's ImageReward with the checkpoint loaded, frozen, in eval mode."""
        module = image_reward_module()
        checkpoint, med_config, tokenizer_folder = self._files()
        blip_pretrain = sys.modules["ImageReward.models.BLIP.blip_pretrain"]
        tokenizer = lambda: blip_tokenizer(tokenizer_folder)  # noqa: E731
        with _replaced(blip_pretrain, "init_tokenizer", tokenizer):
            model = module.ImageReward(med_config=str(med_config), device="cpu")
        state = read_torch_weights(checkpoint, "imagereward")
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ConfigError(f"reward 'imagereward': {checkpoint} is not a state dict")
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1].strip()
            raise ConfigError(
                f"reward 'imagereward': {checkpoint} does not fit the model of "
                f"{med_config.name}: {first}"
            ) from None
        # what the score reads must all come from the file: no silent random weights
        # (position_ids is a fixed arange; vision_proj/text_proj are BLIP's, unused here)
        used = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")
        missing = [k for k in result.missing_keys
                   if k.startswith(used) and not k.endswith("position_ids")]  # fmt: skip
        if missing:
            raise ConfigError(
                f"reward 'imagereward': {checkpoint} lacks {len(missing)} of the model's "
                f"weights (e.g. {missing[0]}); it is not an ImageReward state dict"
            )
        model.requires_grad_(False)
        return model.eval()

    def to(self, device: torch.device | str) -> ImageRewardReward:
        self.model.to(device)
        self.model.device = torch.device(device)  # score_gard puts its image mask there
        return self

    def __call__(self, images: Tensor, prompts: Any = None) -> Tensor:
        model = self.model
        text = model.blip.tokenizer(
            _prompts(prompts, images.shape[0], "imagereward"), padding="max_length",
            truncation=True, max_length=PROMPT_TOKENS, return_tensors="pt",
        ).to(model.device)  # fmt: skip
        pixels = clip_preprocess(images.to(model.device), IMAGE_SIZE, CLIP_MEAN, CLIP_STD)
        return model.score_gard(text.input_ids, text.attention_mask, pixels).squeeze(1).float()
