"""Which Stable Diffusion family a local diffusers folder holds, read from its
``model_index.json``: the families the sd task fine-tunes (SD 1.x/2.x, SDXL, SD 3/3.5 and FLUX.1)
differ in their text encoders, the extra conditioning their denoiser takes, how their VAE
decodes and, for SD 3/3.5 and FLUX.1, in the denoiser itself (a transformer predicting a
rectified-flow velocity, stepped by the flow kernel instead of DDIM; FLUX's on packed 2×2
latent patches, with a guidance embedding instead of CFG); everything else (LoRA, rewards,
methods) is shared. Also whether a consistency model given for the folder (an LCM-LoRA file,
an LCM UNet folder; for SD 3/3.5 and FLUX.1 a few-step distilled transformer) fits its family,
checked before peft or diffusers meet a shape they cannot use."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqdf.errors import ConfigError, SqdfError
from sqdf.infra.weights import weights_variant


@dataclass(frozen=True)
class Family:
    """What differs between the families, by the pipeline class that loads them."""

    name: str  # the short name used in messages and results
    pipeline: str  # the diffusers pipeline class of the folder
    label: str  # for people: "SD 1.x/2.x", "SDXL", "SD 3/3.5", "FLUX.1"
    text_encoders: tuple[str, ...]  # subfolders, in the order the pipeline concatenates them
    # their transformers classes: SDXL's second carries the projection that is the pooled
    # embedding
    text_encoder_classes: tuple[str, ...]
    tokenizers: tuple[str, ...]
    # SDXL conditions its UNet on the pooled projection of the last text encoder and on
    # (original size, crop, target size); SD3 its transformer on both CLIPs' projections;
    # SD 1.x/2.x on the prompt's hidden states alone
    pooled: bool
    # SDXL's VAE config may carry per-channel latent mean/std that its pipeline undoes
    # before decoding; the SD 1.x/2.x pipeline divides by the scaling factor only
    latent_mean_std: bool
    # SDXL's VAE overflows in float16: its pipeline decodes in float32 where the VAE config
    # says force_upcast; the SD 1.x/2.x pipeline decodes in the weights' dtype
    upcast_vae_in_float16: bool
    # pipeline arguments for sqdf sample's renders, which are ours to look at: no SD safety
    # checker, no SDXL watermark (added where its package is installed)
    render_options: tuple[tuple[str, Any], ...]
    # the network that is fine-tuned: its subfolder and diffusers class
    denoiser: str = "unet"
    denoiser_class: str = "UNet2DConditionModel"
    # SD3: a rectified flow (sqdf.core.flow) on its FlowMatchEulerDiscreteScheduler's time grid;
    # otherwise DDIM on a DDPM noise schedule
    flow: bool = False
    size_ids: bool = False  # SDXL: the UNet takes (original size, crop, target size)
    # SDXL: an empty negative prompt is zeros where model_index.json says
    # force_zeros_for_empty_prompt; the other pipelines encode the empty string
    zeros_for_empty_negative: bool = False
    latent_shift: bool = False  # SD3: the VAE config's shift_factor is added after unscaling
    # components a folder may leave out where its model_index.json says [null, null] (SD3's
    # T5, which its pipeline then replaces by zeros)
    optional: tuple[str, ...] = ()
    # FLUX: the transformer takes the latents as a sequence of 2×2 patches with their
    # positions (img_ids, txt_ids), the time t itself, and a guidance scale as an input where
    # it is guidance-distilled; its prompts are T5's states and CLIP-L's pooled output
    packed: bool = False

    @property
    def components(self) -> tuple[str, ...]:
        return (self.denoiser, "vae", *self.text_encoders, *self.tokenizers, "scheduler")

    def denoiser_model(self) -> Any:
        import diffusers

        return getattr(diffusers, self.denoiser_class)

    def pipeline_class(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline)

    def text_encoder_class(self, index: int) -> Any:
        import transformers

        return getattr(transformers, self.text_encoder_classes[index])


FAMILIES = {
    "sd": Family(
        "sd", "StableDiffusionPipeline", "SD 1.x/2.x", ("text_encoder",), ("CLIPTextModel",),
        ("tokenizer",), pooled=False, latent_mean_std=False, upcast_vae_in_float16=False,
        render_options=(("safety_checker", None), ("feature_extractor", None),
                        ("requires_safety_checker", False)),
    ),
    "sdxl": Family(
        "sdxl", "StableDiffusionXLPipeline", "SDXL", ("text_encoder", "text_encoder_2"),
        ("CLIPTextModel", "CLIPTextModelWithProjection"), ("tokenizer", "tokenizer_2"),
        pooled=True, latent_mean_std=True, upcast_vae_in_float16=True,
        render_options=(("add_watermarker", False),), size_ids=True,
        zeros_for_empty_negative=True,
    ),
    "sd3": Family(
        "sd3", "StableDiffusion3Pipeline", "SD 3/3.5",
        ("text_encoder", "text_encoder_2", "text_encoder_3"),
        ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"),
        ("tokenizer", "tokenizer_2", "tokenizer_3"), pooled=True, latent_mean_std=False,
        upcast_vae_in_float16=False, render_options=(), denoiser="transformer",
        denoiser_class="SD3Transformer2DModel", flow=True, latent_shift=True,
        optional=("text_encoder_3", "tokenizer_3"),
    ),
    "flux": Family(
        "flux", "FluxPipeline", "FLUX.1", ("text_encoder", "text_encoder_2"),
        ("CLIPTextModel", "T5EncoderModel"), ("tokenizer", "tokenizer_2"), pooled=True,
        latent_mean_std=False, upcast_vae_in_float16=False, render_options=(),
        denoiser="transformer", denoiser_class="FluxTransformer2DModel", flow=True,
        latent_shift=True, packed=True,
    ),
}  # fmt: skip
BY_PIPELINE = {f.pipeline: f for f in FAMILIES.values()}


def read_model_index(folder: str | Path) -> dict[str, Any]:
    """The folder's model_index.json; {} where it has none (a folder downloaded part by
    part often lacks it)."""
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"task 'sd': cannot read {path}: {err}") from None
    if not isinstance(index, dict):
        raise ConfigError(f"task 'sd': {path} is not a JSON object")
    return index


def _optional_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a missing or broken file is reported where it is loaded
    return doc if isinstance(doc, dict) else {}


# SDXL's UNet adds the pooled text and size ids to its time embedding; SD 1.x/2.x's adds none
ADDITION_EMBEDS = {"sd": None, "sdxl": "text_time"}
# schedulers of another noising process than the DDPM one sqdf's DDIM kernel steps through
SAMPLER_SCHEDULERS = ("EDM", "FlowMatch")
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"  # SD3's and FLUX's, read by the flow kernel


def absent_components(folder: str | Path, family: Family) -> tuple[str, ...]:
    """The family's optional components that the folder's model_index.json leaves out (SD3
    without T5: ``"text_encoder_3": [null, null]``), which its pipeline must be given as None."""
    index = read_model_index(folder)
    return tuple(
        c for c in family.optional if isinstance(index.get(c), list) and index[c][-1:] == [None]
    )


def family_of(folder: str | Path) -> Family:
    """The family of the pipeline in ``folder`` (its model_index.json, else its layout), with
    its components, its denoiser's class and conditioning and its scheduler checked from
    configs alone."""
    folder = Path(folder)
    index = read_model_index(folder)
    if index:
        name = index.get("_class_name")
        family = BY_PIPELINE.get(name) if isinstance(name, str) else None
        if family is None:
            supported = ", ".join(f"{f.pipeline} ({f.label})" for f in FAMILIES.values())
            raise ConfigError(
                f"task 'sd': {folder} holds a {name or 'pipeline without _class_name'}; "
                f"supported: {supported}"
            )
    elif (folder / "transformer").is_dir():
        raise ConfigError(
            f"task 'sd': {folder} has a transformer/ but no model_index.json, which says "
            "which pipeline it is (StableDiffusion3Pipeline for SD 3/3.5, FluxPipeline for FLUX.1)"
        )
    else:  # no index: a second text encoder says SDXL
        family = FAMILIES["sdxl" if (folder / "text_encoder_2").is_dir() else "sd"]
    absent = absent_components(folder, family)
    missing = [c for c in family.components if c not in absent and not (folder / c).is_dir()]
    if missing:
        optional = [c for c in missing if c in family.optional]
        hint = (
            f'; a folder without {optional[0]}/ says "{optional[0]}": [null, null] in '
            f"model_index.json, as {family.pipeline}(..., {optional[0]}=None) runs without it"
            if optional
            else ""
        )
        raise ConfigError(
            f"task 'sd': {folder} is not a complete {family.label} folder "
            f"(missing {', '.join(c + '/' for c in missing)}){hint}"
        )
    _check_denoiser(folder, family, index)
    _check_scheduler(folder, family)
    return family


def _check_denoiser(folder: Path, family: Family, index: dict[str, Any]) -> None:
    """The denoiser's class (by the index and its config) is the family's, and a UNet's added
    conditioning is its family's."""
    config = _optional_json(folder / family.denoiser / "config.json")
    entry = index.get(family.denoiser)
    named = [entry[-1] if isinstance(entry, list) and entry else None, config.get("_class_name")]
    other = next((c for c in named if isinstance(c, str) and c != family.denoiser_class), None)
    if other is not None:
        raise ConfigError(
            f"task 'sd': {folder}/{family.denoiser} is a {other}; a {family.pipeline} folder's "
            f"is a {family.denoiser_class}"
        )
    if family.name not in ADDITION_EMBEDS:
        return
    embed = config.get("addition_embed_type")
    if config and embed != ADDITION_EMBEDS[family.name]:
        raise ConfigError(
            f"task 'sd': {folder}/unet has addition_embed_type {embed!r}, where {family.label} "
            f"UNets have {ADDITION_EMBEDS[family.name]!r}: the folder mixes families"
        )


def _check_scheduler(folder: Path, family: Family) -> None:
    """EDM and flow-matching schedulers describe another noising process than the DDPM one
    sqdf's DDIM kernel steps through; any DDPM scheduler's noise levels serve (whatever its
    timestep spacing: sqdf steps at "leading", and ``sqdf sample`` renders the same way). A
    flow family's scheduler must be the flow-matching Euler one whose time grid the flow
    kernel takes."""
    config = _optional_json(folder / "scheduler" / "scheduler_config.json")
    name = str(config.get("_class_name", ""))
    if family.flow:
        if config and name != FLOW_SCHEDULER:
            raise ConfigError(
                f"task 'sd': {folder}/scheduler is a {name or 'scheduler without _class_name'}; "
                f"sqdf steps {family.label} through the time grid of a {FLOW_SCHEDULER}"
            )
        if config.get("invert_sigmas"):
            raise ConfigError(
                f"task 'sd': {folder}/scheduler inverts its sigmas (a Mochi setting); "
                f"{family.label} runs from noise (t = 1) to data (t = 0)"
            )
        return
    if any(kind in name for kind in SAMPLER_SCHEDULERS):
        raise ConfigError(
            f"task 'sd': {folder}/scheduler is a {name}; sqdf samples with DDIM on a DDPM noise "
            "schedule (the SD 1.x/2.x and SDXL base schedulers)"
        )


def zero_negative_for_empty(folder: str | Path) -> bool:
    """Whether an absent negative prompt is a zero embedding (SDXL's
    ``force_zeros_for_empty_prompt``, on unless the folder turns it off) rather than the
    encoded empty string."""
    return bool(read_model_index(folder).get("force_zeros_for_empty_prompt", True))


def read_config(folder: str | Path, sub: str) -> dict[str, Any]:
    """The ``config.json`` of one component of the folder."""
    path = Path(folder) / sub / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SqdfError(f"cannot read {path}: {err}") from None


def load_part(cls: Any, folder: str | Path, sub: str, **kw: Any) -> Any:
    """One component, from the local folder only (nothing is downloaded); its safetensors in
    the variant the folder holds (a Hub download for a 16-bit run keeps fp16 alone)."""
    if kw.get("use_safetensors"):
        variant = weights_variant(Path(folder) / sub)
        if variant is not None:
            kw["variant"] = variant
    try:
        return cls.from_pretrained(str(folder), subfolder=sub, local_files_only=True, **kw)
    except (OSError, ValueError) as err:
        raise SqdfError(f"cannot load {sub}/ of {folder}: {str(err).splitlines()[0]}") from None


# the cross-attention width of a UNet says its family
CROSS_ATTENTION_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def unet_label(unet: Any, default: str) -> str:
    """The family of a loaded UNet by its cross-attention width (SD 1.x, SD 2.x, SDXL)."""
    return CROSS_ATTENTION_FAMILIES.get(unet.config.get("cross_attention_dim"), default)


def _made_for(width: Any) -> str:
    made_for = CROSS_ATTENTION_FAMILIES.get(width) if isinstance(width, int) else None
    return f"; it looks made for {made_for}" if made_for else ""


NETWORK_NAMES = {"unet": "UNet", "transformer": "transformer"}  # a denoiser, in messages


def check_lora_fits(
    state: dict[str, Any], net: Any, path: Any, label: str, prefix: str = "unet"
) -> None:
    """Refuse a diffusers-format LoRA (``lora_state_dict``'s output) of the denoiser ``net``
    (its keys under ``prefix``: unet, or SD3's transformer) whose layers are not this
    network's, or not their shapes: a LoRA of another family. peft would otherwise fail with
    a shape error from deep inside, or skip the layers it cannot find."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    what = NETWORK_NAMES.get(prefix, prefix)
    lora = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
    if not lora:
        raise ConfigError(f"{path} holds no {what} LoRA weights (no {prefix}.* keys)")
    if not any("lora_A" in k for k in lora):
        lora = convert_unet_state_dict_to_peft(lora)
    modules = dict(net.named_modules())
    bad, total, width = [], 0, None
    for key, value in lora.items():
        name, sep, tail = key.rpartition(".lora_")
        kind = tail[:1]
        if not sep or kind not in ("A", "B"):
            continue
        total += 1
        if kind == "A" and prefix == "unet" and name.endswith("attn2.to_k"):
            width = int(value.shape[1])  # the UNet's cross-attention: the text's width
        module = modules.get(name)
        weight = getattr(getattr(module, "base_layer", module), "weight", None)
        if weight is None:
            bad.append(f"{name} (no such layer)")
        elif kind == "A" and value.shape[1] != weight.shape[1]:
            bad.append(f"{name} (takes {weight.shape[1]}, the LoRA gives {value.shape[1]})")
        elif kind == "B" and value.shape[0] != weight.shape[0]:
            bad.append(f"{name} (gives {weight.shape[0]}, the LoRA {value.shape[0]})")
    if bad:
        raise ConfigError(
            f"{path} does not fit this {unet_label(net, label)} {what}: {len(bad)} of its "
            f"{total} LoRA matrices do not match, e.g. {bad[0]}{_made_for(width)}"
        )


def check_unet_fits(config: dict[str, Any], unet: Any, path: Any, label: str) -> None:
    """Refuse a UNet folder to stand beside or in for ``unet`` (an LCM UNet, a fine-tuned
    UNet) whose latents or conditioning differ, by its config, before its weights load."""
    keys = ("in_channels", "cross_attention_dim", "addition_embed_type")
    differ = [k for k in keys if k in config and config[k] != unet.config.get(k)]
    if differ:
        key = differ[0]
        raise ConfigError(
            f"{path} does not fit this {unet_label(unet, label)} UNet: its {key} is "
            f"{config.get(key)!r}, the model's {unet.config.get(key)!r}"
            f"{_made_for(config.get('cross_attention_dim'))}"
        )


# what a distilled transformer shares with the model's to read the same latents and text
TRANSFORMER_FIT_KEYS = ("in_channels", "patch_size", "joint_attention_dim", "pooled_projection_dim")


def distilled_transformer(path: str | Path, folder: str | Path, family: Family) -> Path:
    """The transformer folder of a few-step distilled model (SD 3.5 Large Turbo's, FLUX.1
    schnell's) given as a flow family's consistency model: ``path`` itself, or the
    ``transformer/`` of a pipeline folder at ``path``; refused, by its config alone, where it
    is another class or does not read the latents and text of the model in ``folder``."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(
            f"sd lcm: {path} is a file; for {family.label} the consistency model is a few-step "
            f"distilled {family.denoiser_class} folder (or its pipeline's folder), not a LoRA"
        )
    if (path / "model_index.json").is_file():
        path = path / family.denoiser
    config = _optional_json(path / "config.json")
    name = config.get("_class_name")
    if name != family.denoiser_class:
        what = f"a {name}" if isinstance(name, str) else "no diffusers model (no config.json)"
        raise ConfigError(
            f"sd lcm: {path} holds {what}; a consistency model for {family.label} is a "
            f"{family.denoiser_class} folder"
        )
    model = read_config(folder, family.denoiser)
    differ = [k for k in TRANSFORMER_FIT_KEYS if config.get(k) != model.get(k)]
    if differ:
        key = differ[0]
        raise ConfigError(
            f"sd lcm: {path} does not fit this {family.label} transformer: its {key} is "
            f"{config.get(key)!r}, the model's {model.get(key)!r}"
        )
    return path
