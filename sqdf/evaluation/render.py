"""``sqdf sample --task sd``: render prompts with a plain diffusers pipeline of the model's
family (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline or
FluxPipeline) and the weights in ``RUN/final`` (a LoRA, or a fully fine-tuned UNet), the way a
user of the fine-tuned weights would, into one picture."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sqdf.errors import SqdfError
from sqdf.infra.atomic import make_folder
from sqdf.infra.weights import resolve, weights_variant
from sqdf.tasks.sd_family import Family, absent_components, load_part, read_config
from sqdf.tasks.sd_prompts import load_prompt_pairs
from sqdf.tasks.sd_text import flux_t5_length

LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class RenderSettings:
    """How to render: the run's own settings where RUN/final has a run beside it."""

    prompts: str = "animals"
    guidance: float = 5.0
    num_steps: int = 50
    negative_prompt: str = ""
    resolution: int | None = None  # image side in pixels (None: the pipeline's default)
    true_cfg: float = 1.0  # FLUX.1: FluxPipeline's true_cfg_scale (1: no negative pass)


def run_of(final: Path | None) -> Path | None:
    """The run folder whose RUN/final (or RUN/final/ema, the moving average) ``final`` is."""
    if final is None:
        return None
    final = final.resolve()
    run = (
        final.parent.parent
        if final.name == "ema" and final.parent.name == "final"
        else final.parent
    )
    return run if (run / "config.json").is_file() else None


def trained_settings(final: Path | None) -> RenderSettings:
    """The prompts, CFG scale, DDIM steps, negative prompt and resolution the sd run that
    wrote ``final`` trained with (what its policy was fine-tuned to produce); the defaults
    without one. Read from its config as they are: nothing the run pointed at (model, LCM,
    prompts file) has to be where it was."""
    run = run_of(final)
    if run is None:
        return RenderSettings()
    from sqdf.run.folder import read_run_config
    from sqdf.tasks.sd import SDConfig

    cfg = read_run_config(run)
    if cfg.task != "sd":
        raise SqdfError(f"{run} is a {cfg.task} run; --task sd renders sd runs")
    given = {**{f.name: f.default for f in dataclasses.fields(SDConfig)}, **cfg.task_params}
    resolution = given["resolution"]
    return RenderSettings(
        str(given["prompts"]), float(given["guidance"]), cfg.num_steps,
        str(given["negative_prompt"]), None if resolution is None else int(resolution),
        float(given["true_cfg"]),
    )  # fmt: skip


def render_sd(
    model: str,
    lora: str | None,
    prompts: str | None,
    out: str | Path,
    *,
    num_images: int = 8,
    seed: int = 0,
    guidance: float | None = None,
    num_steps: int | None = None,
    device: str = "auto",
) -> Path:
    """A grid of ``num_images`` images, prompts taken in turn; with ``lora`` and without it
    (same seeds), so the fine-tuning's effect is one look away. ``prompts``, ``guidance``
    and ``num_steps`` left None are the training run's (``lora``'s parent folder), with its
    negative prompts, else the defaults of :class:`RenderSettings`. The UNet families render
    with DDIM at eta 1 (the chain they trained on); SD 3/3.5 and FLUX.1 with their own
    flow-matching Euler scheduler (the deterministic sampler of the flow the SDE shares its
    marginals with). FLUX.1 renders as it trains: ``guidance`` is FLUX.1-dev's distilled
    guidance scale, and a negative prompt is passed only where the run set true CFG."""
    from diffusers import DDIMScheduler

    from sqdf.infra.report import save_image_rows
    from sqdf.tasks import resolve_device
    from sqdf.tasks.sd_family import check_lora_fits, check_unet_fits, family_of

    if num_images < 1:
        raise SqdfError(f"--num-samples must be >= 1, got {num_images}")
    dev = resolve_device(device)
    lora = None if lora is None else resolve(lora, "sqdf sample --lora")
    final = Path(lora) if lora is not None else None
    full = final is not None and (final / "unet" / "config.json").is_file()  # a whole UNet
    if final is not None and not full and not (final / LORA_FILE).is_file():
        raise SqdfError(  # before any weights are loaded
            f"{lora} holds neither {LORA_FILE} nor unet/ (use the RUN/final folder of an sd run)"
        )
    # the run's config first: its record pins the model to the commit the run trained on
    trained = trained_settings(final)
    # a Hub reference is fetched (16-bit weights where the pipeline renders in bfloat16)
    model = resolve(model, "sqdf sample --model", half=dev.type == "cuda")
    prompts = prompts if prompts is not None else trained.prompts
    guidance = guidance if guidance is not None else trained.guidance
    num_steps = num_steps if num_steps is not None else trained.num_steps
    if not (math.isfinite(guidance) and guidance >= 0):
        raise SqdfError(f"--guidance must be a finite number >= 0, got {guidance}")
    if num_steps < 1:
        raise SqdfError(f"--num-steps must be >= 1, got {num_steps}")
    make_folder(Path(out).parent, "folder")
    family = family_of(model)
    if full and family.denoiser != "unet":
        raise SqdfError(f"{lora} holds a fine-tuned UNet; {family.label} has a {family.denoiser}")
    run = run_of(final)
    if run is not None:
        chain = "flow-matching Euler" if family.flow else "DDIM"
        print(
            f"sqdf sample: prompts {prompts}, guidance {guidance:g}, {num_steps} {chain} steps"
            + (f", negative prompt {trained.negative_prompt!r}" if trained.negative_prompt else "")
            + f" (those not given: as {run} trained)",
            file=sys.stderr,
        )
    pairs = load_prompt_pairs(prompts)  # before any weights are loaded
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    try:
        pipe = _load_pipeline(Path(model), family, dtype)
    except (OSError, ValueError) as err:
        raise SqdfError(f"cannot load a {family.pipeline} from {model}: {err}") from None
    if full:  # weights of another family: one line now, not a shape error after a row
        check_unet_fits(read_config(final, "unet"), pipe.unet, final / "unet", family.label)
    elif final is not None:
        state = family.pipeline_class().lora_state_dict(str(final))
        state = state[0] if isinstance(state, tuple) else state  # SD3's comes without alphas
        net = getattr(pipe, family.denoiser)
        check_lora_fits(state, net, final, family.label, family.denoiser)
    sampler: dict[str, Any] = {}
    if family.packed:  # the T5 length the task trained on: schnell's 256, dev's 512
        sampler["max_sequence_length"] = flux_t5_length(dict(pipe.transformer.config))
    if not family.flow:
        # the chain the policy was trained on: DDIM at "leading" spacing, eta 1, whatever the
        # folder says
        config = pipe.scheduler.config
        pipe.scheduler = DDIMScheduler.from_config(config, timestep_spacing="leading")
        sampler["eta"] = 1.0
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    chosen = [pairs[i % len(pairs)] for i in range(num_images)]
    side = trained.resolution
    size = {} if side is None else {"height": side, "width": side}
    rows: list[tuple[str, torch.Tensor]] = []

    def draw() -> torch.Tensor:
        images = []
        for i, (prompt, own) in enumerate(chosen):  # one at a time: the same seed per image
            g = torch.Generator().manual_seed(seed + i)
            negative = trained.negative_prompt if own is None else own  # as the task pairs them
            if not family.packed:
                sampler["negative_prompt"] = negative or None
            elif trained.true_cfg != 1.0:  # FLUX.1's true CFG: "" is the empty prompt's pass
                sampler.update(negative_prompt=negative, true_cfg_scale=trained.true_cfg)
            out = pipe(prompt, num_inference_steps=num_steps, guidance_scale=guidance,
                       generator=g, output_type="pt", **sampler, **size)  # fmt: skip
            images.append(out.images[0].float().cpu())
        return torch.stack(images)

    if lora is not None:
        rows.append(("reference", draw()))
        if full:
            from diffusers import UNet2DConditionModel

            pipe.unet = UNet2DConditionModel.from_pretrained(
                str(final / "unet"), local_files_only=True, use_safetensors=True,
                dtype=pipe.unet.dtype,
            ).to(dev)  # fmt: skip
        else:
            pipe.load_lora_weights(lora)
        rows.append(("fine-tuned", draw()))
    else:
        rows.append(("reference", draw()))
    return save_image_rows(rows, [prompt for prompt, _ in chosen], Path(out))


def _load_pipeline(folder: Path, family: Family, dtype: torch.dtype) -> Any:
    """The family's pipeline from a local folder; one without model_index.json (which
    diffusers' from_pretrained needs, and training does not) is assembled from its parts."""
    cls, extra = family.pipeline_class(), dict(family.render_options)
    extra |= {c: None for c in absent_components(folder, family)}  # SD3 without T5
    if (folder / "model_index.json").is_file():
        variant = weights_variant(folder / family.denoiser)  # fp16 alone, from the Hub
        if variant is not None:
            extra["variant"] = variant
        return cls.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, dtype=dtype, **extra
        )
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    safe = {"use_safetensors": True, "dtype": dtype}
    parts: dict[str, Any] = {
        "unet": load_part(UNet2DConditionModel, folder, "unet", **safe),
        "vae": load_part(AutoencoderKL, folder, "vae", **safe),
        "scheduler": load_part(DDIMScheduler, folder, "scheduler"),
    }
    for i, (encoder, tokenizer) in enumerate(
        zip(family.text_encoders, family.tokenizers, strict=True)
    ):
        parts[encoder] = load_part(family.text_encoder_class(i), folder, encoder, **safe)
        parts[tokenizer] = load_part(CLIPTokenizer, folder, tokenizer)
    return cls(**parts, **extra)
