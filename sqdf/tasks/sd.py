"""Stable Diffusion (SD 1.x/2.x, SDXL and SD 3/3.5) and FLUX.1 from a local diffusers folder,
fine-tuned as a peft LoRA on its denoiser (the UNet; SD3's or FLUX's transformer).

The family is read from the folder's ``model_index.json`` (sqdf.tasks.sd_family); prompts are
encoded once as that family's pipeline encodes them (sqdf.tasks.sd_text) and the text encoders
are then let go. The UNet families step with DDIM on their DDPM noise schedule; SD3 and FLUX
with the rectified-flow SDE (sqdf.core.flow) on their pipeline's shifted time grid, the
transformer's velocity giving x̂0 = x_t - t v (FLUX's transformer reads the latents packed into
2×2 patches, sqdf.tasks.sd_flux; the samples stay unpacked). The reference is the same network
with the adapter off (one copy of the weights); with ``finetune = "full"`` every UNet weight
trains and the reference is a frozen copy. x̂0 comes from the reference network (Tweedie) or
from a consistency model: for the UNet families a latent consistency model (an LCM UNet
folder, or an LCM-LoRA loaded beside the policy's adapter on the base UNet); for SD 3/3.5 and
FLUX.1 a few-step distilled transformer (SD 3.5 Large Turbo's, FLUX.1 schnell's), whose
velocity at t gives x̂0 = x_t - t v in one call. Only x̂0 latents are decoded by the VAE
(with gradients) for the reward; the trajectory stays in latent space.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sqdf.config.params import build_settings
from sqdf.core.flow import flow_x0
from sqdf.core.kernel import DDIMKernel, FlowKernel
from sqdf.core.x0 import consistency_x0, guidance_embedding, nearest_timesteps
from sqdf.errors import ConfigError, SqdfError
from sqdf.infra.checkpoint import save_weights
from sqdf.infra.weights import (
    OfflineWeightError,
    parse_hub_ref,
    plan_unreached,
    planning_now,
    resolve,
)
from sqdf.tasks.base import Task, _expand, schedule_of
from sqdf.tasks.finetune import PolicyAndReference, check_network_options
from sqdf.tasks.lora import (
    POLICY_ADAPTER,
    UNMERGEABLE_WARNING,
    activate_only,
    check_lora_init,
    enable_adapter_aware_checkpointing,
    is_policy_weight,
    only_adapter,
)
from sqdf.tasks.quantize import check_quantize_base, quantize_base
from sqdf.tasks.sd_family import (
    FAMILIES,
    FLOW_SCHEDULER,
    Family,
    check_lora_fits,
    check_unet_fits,
    distilled_transformer,
    family_of,
    load_part,
    read_config,
)
from sqdf.tasks.sd_flux import latent_ids, pack_latents, text_ids, unpack_latents
from sqdf.tasks.sd_prompts import load_prompt_pairs, load_prompts
from sqdf.tasks.sd_text import encode_prompts, flux_t5_length, sdxl_time_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LCM_ADAPTER = "lcm"
LCM_TIMESTEPS = ("chain", "distilled")


@dataclass
class SDConfig:
    """The model folder, prompts, guidance, LoRA, consistency model and memory settings."""

    # diffusers pipeline (SD 1.x/2.x, SDXL, SD 3/3.5, FLUX.1): a folder or a Hub reference
    model: str | None = None
    prompts: str = "animals"  # a built-in set (animals, varied) or a file, one prompt a line
    # prompts the run does not train on, for sqdf eval and --eval-every (a set or a file)
    eval_prompts: str = "animals-heldout"
    # CFG's unconditional prompt (a prompts-file line may set its own); "" is none, which
    # SDXL pipelines encode as zeros
    negative_prompt: str = ""
    # classifier-free guidance scale (1 = no guidance); FLUX.1-dev: the distilled guidance
    # scale its transformer takes as an input (one pass, no negative)
    guidance: float = 5.0
    # FLUX.1: FluxPipeline's true_cfg_scale; above 1 a negative pass (negative_prompt, "" the
    # empty prompt) is run beside the prompt's and the two are mixed as CFG mixes them
    true_cfg: float = 1.0
    # CFG's unconditional output without a gradient, as Flow-GRPO trains
    # (scripts/train_sd3.py:190): the loss's gradient reaches the weights through the
    # prompt's pass only; sampling is unchanged
    cfg_detach_uncond: bool = False
    resolution: int | None = None  # image side in pixels (default: the model's native size)
    lora_rank: int = 4  # as in the SQDF reference implementation
    lora_alpha: float = 4.0
    lora_targets: list = dataclasses.field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"]
    )
    # how the LoRA's A is drawn: default (peft's Kaiming-uniform) or gaussian (normal, std 1/rank,
    # the SQDF reference code's)
    lora_init: str = "default"
    # reproduce the SQDF reference code rather than the method: the reward sees the decoded
    # image mapped twice to [0, 1] (x/2 + 1/2 again: [0.5, 1]) and resized bilinearly without
    # a crop; the sqdf loss keeps positive-reward cells only (docs/reproducing.md)
    reference_compat: bool = False
    # estimator consistency with an LCM: read it at the nearest of its own distilled timesteps
    # (with that timestep's alpha-bar, c_skip, c_out), as it was distilled and as the
    # reference code does, or at the chain's timestep ("chain")
    lcm_timesteps: str = "chain"
    # TF32 matrix products on CUDA (torch.backends.cuda.matmul), as the reference code sets
    tf32: bool = False
    # estimator consistency's model: an LCM UNet folder or LCM-LoRA .safetensors (SD 1.x/2.x,
    # SDXL); a few-step distilled transformer folder or its pipeline folder (SD 3/3.5, FLUX.1);
    # each a local path or a Hub reference (docs/weights.md)
    lcm: str | None = None
    lcm_guidance: float = 8.0  # w for an LCM UNet with a guidance embedding (time_cond_proj_dim)
    dtype: str = "auto"  # weights and autocast: auto (bfloat16 on CUDA, float32 on CPU) or a name
    gradient_checkpointing: bool = True  # denoiser, consistency model, VAE decoder, CLIP rewards
    # decode a batch of x̂0 one image at a time (diffusers' VAE slicing): the same images, and
    # the decode's activations of one image at a time in the gradient step (docs/performance.md)
    vae_slicing: bool = False
    finetune: str = "lora"  # lora, or full (every UNet weight, in float32; what FSDP shards)
    # the frozen base under the LoRA: none (the loaded dtype), or int8 (every Linear weight of
    # the denoiser(s) weight-only int8 per output channel, by torchao: half the bf16 bytes;
    # docs/performance.md)
    quantize_base: str = "none"
    compile: bool = False  # torch.compile the denoiser(s)
    channels_last: bool = False  # channels-last denoiser weights
    # SD 3/3.5, FLUX.1: the noise level a of the flow SDE (Flow-GRPO's default; DDIM's is --eta)
    noise_level: float = 0.7
    # SD 3/3.5, FLUX.1: the level at the last step, run linearly from noise_level at the first
    # (None: one level for the whole chain)
    noise_level_end: float | None = None

    def __post_init__(self) -> None:
        check_network_options(self.finetune, self.compile, self.channels_last, "sd")
        check_quantize_base(self.quantize_base, self.finetune, "sd")
        if not self.model:
            raise ConfigError(
                "task 'sd' needs a Stable Diffusion model: --model PATH or a Hub reference "
                "ORG/NAME[@REVISION] (or task_params.model)"
            )
        half = half_weights(self.dtype, _RUN_DEVICE.get())
        self.model = resolve(self.model, "task 'sd' model", half=half)
        family = family_of(self.model)  # a folder of another family, or incomplete, fails here
        if not self.noise_level > 0:
            raise ConfigError(
                f"sd noise_level must be > 0 (the KL needs a stochastic step), got "
                f"{self.noise_level}"
            )
        if self.noise_level_end is not None and not self.noise_level_end > 0:
            raise ConfigError(
                f"sd noise_level_end must be > 0 (the KL needs a stochastic step), got "
                f"{self.noise_level_end}"
            )
        if not family.flow and (self.noise_level, self.noise_level_end) != (0.7, None):
            raise ConfigError(
                f"sd noise_level and noise_level_end are the flow SDE's (SD 3/3.5, FLUX.1); "
                f"{family.label} samples with DDIM, whose noise is --eta"
            )
        if family.flow and self.finetune != "lora":
            raise ConfigError(f"sd finetune {self.finetune!r}: {family.label} trains a LoRA only")
        if self.guidance < 1.0:
            raise ConfigError(f"sd guidance must be >= 1, got {self.guidance}")
        if not self.true_cfg >= 1.0:
            raise ConfigError(f"sd true_cfg must be >= 1 (1 is none), got {self.true_cfg}")
        if not family.packed and self.true_cfg != 1.0:
            raise ConfigError(
                f"sd true_cfg is FLUX.1's negative pass; {family.label} runs CFG by guidance"
            )
        if family.packed:
            _check_flux_guidance(self)
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ConfigError(
                f"sd lora_rank must be >= 1 and lora_alpha > 0, got {self.lora_rank}, "
                f"{self.lora_alpha}"
            )
        check_lora_init(self.lora_init, "sd")
        for name in ("reference_compat", "tf32"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"sd {name} must be true or false, got {getattr(self, name)!r}")
        if self.lcm_timesteps not in LCM_TIMESTEPS:
            raise ConfigError(
                f"sd lcm_timesteps must be one of {', '.join(LCM_TIMESTEPS)}, got "
                f"{self.lcm_timesteps!r}"
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(
                f"sd dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}"
            )
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ConfigError(f"sd resolution must be a multiple of 8, got {self.resolution}")
        if self.lcm is not None:
            given = self.lcm
            try:
                self.lcm = resolve(given, "sd lcm", half=half)
            except OfflineWeightError as err:
                plan_unreached(given, err)  # a dry run goes on and says so; a run stops
            # a plan may hold a Hub reference it has not downloaded; a missing local path is
            # a mistake in a plan as in a run
            if not Path(self.lcm).exists() and (not planning_now() or parse_hub_ref(given) is None):
                raise ConfigError(f"sd lcm: no such folder or file {self.lcm!r}")
        if self.lcm is not None and family.flow and Path(self.lcm).exists():
            distilled_transformer(self.lcm, self.model, family)
        load_prompts(self.prompts)  # a bad prompt set fails here, not mid-run
        load_prompts(self.eval_prompts)


def guidance_embedded(folder: str | Path) -> bool:
    """Whether FLUX's transformer is guidance-distilled (FLUX.1-dev: ``guidance_embeds``)."""
    return bool(read_config(folder, "transformer").get("guidance_embeds", False))


def _check_flux_guidance(options: SDConfig) -> None:
    """FLUX.1-dev takes the guidance scale as an input, FLUX.1 schnell none at all; a
    negative pass is run only with FluxPipeline's true CFG (``true_cfg`` > 1), so a negative
    prompt without it would be ignored, and is refused."""
    if options.true_cfg == 1.0:
        hint = "; set true_cfg > 1 for FluxPipeline's true CFG"
        if options.negative_prompt:
            raise ConfigError(
                "sd negative_prompt: FLUX.1 runs a negative pass only with true CFG (its "
                f"guidance is distilled into the transformer){hint}, or leave it out"
            )
        for spec in (options.prompts, options.eval_prompts):
            if any(negative for _, negative in load_prompt_pairs(spec)):
                raise ConfigError(
                    f"prompts {spec}: a line sets a negative prompt, and FLUX.1 runs a "
                    f"negative pass only with true CFG{hint}, or drop the negatives"
                )
    if not guidance_embedded(options.model) and options.guidance != 1.0:
        raise ConfigError(
            f"sd guidance {options.guidance:g}: this FLUX.1 transformer has no guidance "
            "embedding (schnell); set guidance=1 (true_cfg > 1 adds a negative pass)"
        )


# FluxPipeline.default_sample_size: FLUX's transformer config has no sample_size (1024 px)
FLUX_SAMPLE_SIZE = 128


def _sizes(options: SDConfig) -> tuple[int, int, int]:
    """(latent channels, image side in pixels, VAE downscaling factor) from the denoiser's and
    vae/ configs alone."""
    folder = Path(options.model)
    family = family_of(folder)
    net, vae = read_config(folder, family.denoiser), read_config(folder, "vae")
    try:
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        if family.packed:  # FLUX packs 2×2 latent patches into its 4C input channels
            side = options.resolution or FLUX_SAMPLE_SIZE * factor
            channels, patch = int(net["in_channels"]) // 4, 2
        else:
            side = options.resolution or int(net["sample_size"]) * factor
            channels = int(net["in_channels"])
            patch = int(net.get("patch_size") or 1)  # SD3's transformer embeds 2×2 patches
    except (KeyError, TypeError) as err:
        raise SqdfError(
            f"{folder}: {family.denoiser}/config.json or vae/config.json lacks a usable {err} (a "
            f"diffusers {family.denoiser_class} and AutoencoderKL config have them)"
        ) from None
    if side % (factor * patch):
        what = (
            f"the VAE's {factor}"
            if patch == 1
            else f"{factor * patch} (VAE {factor} × patch {patch})"
        )
        raise ConfigError(f"sd resolution {side} is not a multiple of {what}")
    return channels, side, factor


def vae_upcast(family: Any, dtype: torch.dtype, vae_config: dict) -> bool:
    """Whether the VAE decodes in float32: where the family's pipeline does it for float16
    runs (SDXL's VAE overflows float16), unless the VAE's config says force_upcast false."""
    return (
        family.upcast_vae_in_float16
        and dtype == torch.float16
        and bool(vae_config.get("force_upcast", True))
    )


def image_side(options: SDConfig) -> int:
    """The side in pixels of the images trained on: ``options.resolution``, else the
    denoiser's native size."""
    return _sizes(options)[1]


def latent_shape(options: SDConfig) -> tuple[int, int, int]:
    """(channels, side, side) of the latents the denoiser denoises at :func:`image_side`."""
    channels, side, factor = _sizes(options)
    return (channels, side // factor, side // factor)


class SDTask(Task):
    eval_samples = 64
    eval_batch = 8
    picture_samples = 4

    def __init__(self, cfg: Any, options: SDConfig, reward: Any, device: torch.device):
        from diffusers import AutoencoderKL, DDIMScheduler

        folder = Path(options.model)
        self.family: Family = family_of(folder)
        if cfg.estimator == "consistency" and not options.lcm:  # before loading gigabytes
            what = (
                f"a few-step distilled {self.family.denoiser_class} folder, e.g. SD 3.5 Large "
                "Turbo's or FLUX.1 schnell's transformer/"
                if self.family.flow
                else "an LCM UNet folder or an LCM-LoRA file"
            )
            raise ConfigError(
                f"sd: estimator consistency needs task_params.lcm ({what}); or use estimator "
                "tweedie"
            )
        self.options = options
        self.estimator = cfg.estimator
        self.reward_model = reward
        self.device = device
        if options.dtype == "auto":
            self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            self.dtype = DTYPES[options.dtype]
        self.sample_shape = latent_shape(options)
        if self.family.flow:
            self.schedule = None
            self.kernel, self.time_scale = flow_kernel(folder, cfg.num_steps, options, self.family)
        else:
            sched = load_part(DDIMScheduler, folder, "scheduler")
            self.prediction_type = sched.config.prediction_type
            self.schedule = schedule_of(sched, cfg.num_steps, cfg.eta, "sd")
            self.kernel = DDIMKernel(self.schedule, self.prediction_type)
        # the prompts first, so that the text encoders (T5-XXL: 9.5 GB in bf16) are let go
        # before the denoiser and the VAE are loaded: never all on the GPU at once
        pairs = load_prompt_pairs(options.prompts)
        self.prompts = [p for p, _ in pairs]
        self.train_prompts = len(pairs)  # training draws from these; later ones are held out
        self.negatives = [options.negative_prompt if n is None else n for _, n in pairs]
        # FLUX.1 schnell as FLUX.1-dev's x̂0 network reads its own T5 length: both encoded
        # while the encoders are loaded once
        self.distilled_length = self._distilled_t5_length(folder, cfg.estimator)
        self.text, *distilled = encode_prompts(
            self.family, folder, self.prompts, self.negatives, device, self.dtype,
            [None] + ([] if self.distilled_length is None else [self.distilled_length]),
        )  # fmt: skip
        self.distilled_text = distilled[0] if distilled else None
        safe = {"use_safetensors": True, "dtype": self.dtype}
        self.denoiser = load_part(
            self.family.denoiser_model(), folder, self.family.denoiser, **safe
        ).to(device)
        quantize_base(self.denoiser, options.quantize_base)  # before the LoRA wraps its layers
        # FLUX.1-dev takes the guidance scale as an input instead of a second, negative pass
        self.guidance_input = self.family.packed and bool(self.denoiser.config.guidance_embeds)
        self.vae_upcast = vae_upcast(self.family, self.dtype, read_config(folder, "vae"))
        vae_dtype = torch.float32 if self.vae_upcast else self.dtype
        self.vae = load_part(AutoencoderKL, folder, "vae", use_safetensors=True, dtype=vae_dtype)
        del self.vae.encoder  # only x̂0 latents are decoded; nothing is encoded
        if options.vae_slicing:
            self.vae.enable_slicing()
        self.vae.to(device).requires_grad_(False)
        if self.family.size_ids:
            self.text.time_ids = sdxl_time_ids(
                self.denoiser, self.text.pooled.shape[-1], image_side(options), folder
            ).to(device)

        self.nets = PolicyAndReference(
            self.denoiser, options.finetune, options.lora_rank, options.lora_alpha,
            list(options.lora_targets), options.lora_init,
        )  # fmt: skip
        for p in self.denoiser.parameters():
            if p.requires_grad:  # trainable weights are float32 whatever the loaded dtype
                p.data = p.data.to(device, torch.float32)
        self.policy = self.nets.policy
        self.shardable = self.nets.shardable
        self._consistency_net = None  # an LCM UNet or a distilled transformer
        if options.lcm and self.family.flow:
            # billions of parameters: loaded only for the estimator that reads them
            if cfg.estimator == "consistency":
                self._attach_distilled(distilled_transformer(options.lcm, folder, self.family))
            else:
                warnings.warn(
                    f"sd lcm {options.lcm} is not loaded: estimator {cfg.estimator} does not "
                    "read a consistency model", stacklevel=2,
                )  # fmt: skip
        elif options.lcm:
            self._attach_lcm(Path(options.lcm))
        self.lcm_grid = (
            lcm_distilled_timesteps(folder)
            if options.lcm_timesteps == "distilled" and not self.family.flow
            else None
        )
        apply_tf32(options.tf32, device)
        if options.gradient_checkpointing:
            for net in self.nets.networks:
                enable_adapter_aware_checkpointing(net)
            if self._consistency_net is not None:  # frozen, but x̂0's gradient runs through it
                self._consistency_net.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()
            enable = getattr(reward, "enable_checkpointing", None)  # CLIP-based rewards
            if enable is not None:
                enable()
        # after checkpointing is set up, so that compile sees the blocks as they will run
        self.nets.speed_up(compile=options.compile, channels_last=options.channels_last)
        if hasattr(reward, "to"):
            reward.to(device)

    @property
    def unet(self) -> Any:
        """The denoiser of the UNet families, by their name for it."""
        return self.denoiser

    def _attach_lcm(self, path: Path) -> None:
        from diffusers import UNet2DConditionModel

        if path.is_dir():
            check_unet_fits(
                read_config(path.parent, path.name), self.denoiser, path, self.family.label
            )
            self._consistency_net = load_part(
                UNet2DConditionModel, path.parent, path.name, use_safetensors=True,
                dtype=self.dtype,
            )  # fmt: skip
            self._consistency_net.to(self.device, self.dtype).requires_grad_(False)
            quantize_base(self._consistency_net, self.options.quantize_base)
            return
        # on the pretrained weights: the reference network (under LoRA, the policy's own)
        base = self.nets.reference_net
        state, alphas = self.family.pipeline_class().lora_state_dict(str(path))
        check_lora_fits(state, base, path, self.family.label)
        with warnings.catch_warnings():  # peft warns of a second adapter: that is the point
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            warnings.filterwarnings("ignore", message=UNMERGEABLE_WARNING)
            base.load_lora_adapter(
                state, prefix="unet", network_alphas=alphas, adapter_name=LCM_ADAPTER
            )
        for name, p in base.named_parameters():  # the LCM-LoRA is frozen
            p.requires_grad_(base is self.denoiser and is_policy_weight(name))
        # peft activates an adapter it loads; the LCM-LoRA runs only in consistency_x0: under
        # LoRA the policy's adapter stays the active one, a full reference copy has none
        activate_only(base, POLICY_ADAPTER if base is self.denoiser else None)

    def _distilled_t5_length(self, folder: Path, estimator: str) -> int | None:
        """The T5 length of a FLUX consistency transformer where it is not the model's
        (FLUX.1 schnell, 256 tokens, as FLUX.1-dev's x̂0 network, 512): it is given the
        prompts encoded as its own pipeline encodes them. None where the model's serve."""
        lcm = self.options.lcm
        if not (self.family.packed and lcm and estimator == "consistency"):
            return None
        net = distilled_transformer(lcm, folder, self.family)
        length = flux_t5_length(read_config(net.parent, net.name))
        return None if length == flux_t5_length(read_config(folder, "transformer")) else length

    def _attach_distilled(self, path: Path) -> None:
        net = load_part(
            self.family.denoiser_model(), path.parent, path.name, use_safetensors=True,
            dtype=self.dtype,
        )  # fmt: skip
        self._consistency_net = net.to(self.device, self.dtype).requires_grad_(False)
        quantize_base(self._consistency_net, self.options.quantize_base)

    def _autocast(self) -> Any:
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def _no_autocast(self) -> Any:
        """Autocast off, for the upcast VAE's float32 decode."""
        return torch.autocast(self.device.type, enabled=False)

    def sample_conditions(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, self.train_prompts, (n,), generator=generator)

    def add_prompts(self, pairs: list[tuple[str, str | None]]) -> Tensor:
        """Condition indices (P,) for (prompt, negative or None) pairs, encoding those not
        met before (the text encoders are loaded again for them, then let go). Training
        never draws them."""
        known = {pair: i for i, pair in enumerate(zip(self.prompts, self.negatives, strict=True))}
        negatives = [self.options.negative_prompt if n is None else n for _, n in pairs]
        wanted = zip([p for p, _ in pairs], negatives, strict=True)
        new = [pair for pair in dict.fromkeys(wanted) if pair not in known]
        if new:
            lengths = [None] + ([] if self.distilled_text is None else [self.distilled_length])
            more, *distilled = encode_prompts(
                self.family, Path(self.options.model), [p for p, _ in new], [n for _, n in new],
                self.device, self.dtype, lengths,
            )  # fmt: skip
            for pair in new:
                known[pair] = len(self.prompts)
                self.prompts.append(pair[0])
                self.negatives.append(pair[1])
            self.text = self.text.extended(more)
            if self.distilled_text is not None:
                self.distilled_text = self.distilled_text.extended(distilled[0])
        return torch.tensor([known[(p, n)] for (p, _), n in zip(pairs, negatives, strict=True)])

    def _denoise(self, net: Any, x: Tensor, t: Tensor, kwargs: dict[str, Any]) -> Tensor:
        if self.family.packed:  # FLUX: x (B, C, H, W) in and out; t itself (time_scale 1)
            h, w = x.shape[-2:]
            out = net(
                hidden_states=pack_latents(x), timestep=t * self.time_scale,
                img_ids=latent_ids(h, w, x.device, x.dtype),
                txt_ids=text_ids(kwargs["encoder_hidden_states"].shape[1], x.device, x.dtype),
                **kwargs,
            ).sample  # fmt: skip
            return unpack_latents(out, h, w)
        if self.family.flow:  # SD3's transformer takes the time as its scheduler's: t · 1000
            return net(hidden_states=x, timestep=t * self.time_scale, **kwargs).sample
        return net(x, t, **kwargs).sample

    def _eps(self, net: Any, x: Tensor, t: Tensor, cond: Tensor, guidance: float) -> Tensor:
        """The guided output (noise, v or velocity) at model times ``t`` (B,)."""
        if self.family.packed:  # FLUX.1-dev's guidance scale is an input, in every pass
            true_cfg = self.options.true_cfg
            if true_cfg != 1.0:  # the negative's pass batched beside the prompt's
                x, t = torch.cat([x, x]), torch.cat([t, t])
                kwargs = self.text.guided_kwargs(cond)
            else:
                kwargs = self.text.unet_kwargs(cond)
            if self.guidance_input:
                kwargs["guidance"] = torch.full((len(t),), guidance, device=t.device)
            out = self._denoise(net, x.to(self.dtype), t, kwargs)
            if true_cfg == 1.0:
                return out
            uncond, c = out.chunk(2)
            if self.options.cfg_detach_uncond:
                uncond = uncond.detach()
            return uncond + true_cfg * (c - uncond)
        if guidance == 1.0:
            return self._denoise(net, x.to(self.dtype), t, self.text.unet_kwargs(cond))
        # both halves of classifier-free guidance in one batched pass
        both = self._denoise(
            net, torch.cat([x, x]).to(self.dtype), torch.cat([t, t]), self.text.guided_kwargs(cond)
        )
        uncond, c = both.chunk(2)
        if self.options.cfg_detach_uncond:
            uncond = uncond.detach()
        return uncond + guidance * (c - uncond)

    def model_output(self, x: Tensor, timesteps: Tensor, cond: Tensor, *, policy: bool) -> Tensor:
        t, cond = timesteps.clamp(min=0).to(self.device), cond.to(self.device)
        with self._autocast():
            with self.nets.network(policy=policy) as net:
                out = self._eps(net, x, t, cond, self.options.guidance)
        return out.float()

    def consistency_x0(self, x: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        if self.family.flow:
            return self._distilled_x0(x, timesteps, cond)
        if self.lcm_grid is not None:  # the LCM's own timestep: its ᾱ, c_skip, c_out too
            timesteps = nearest_timesteps(timesteps, self.lcm_grid)
        t, cond = timesteps.clamp(min=0).to(self.device), cond.to(self.device)
        abar = _expand(self.schedule.abar(timesteps.cpu()), x).to(x)
        text = self.text.unet_kwargs(cond)
        with self._autocast():
            if self._consistency_net is not None:
                w_cond = None
                dim = self._consistency_net.config.time_cond_proj_dim
                if dim is not None:
                    w = torch.full((x.shape[0],), self.options.lcm_guidance - 1.0)
                    w_cond = guidance_embedding(w, dim).to(self.device, self.dtype)
                net = self._consistency_net
                out = net(x.to(self.dtype), t, timestep_cond=w_cond, **text).sample
            else:
                base = self.nets.reference_net
                with only_adapter(base, LCM_ADAPTER):
                    out = base(x.to(self.dtype), t, **text).sample
        return consistency_x0(out.float(), x, abar, _expand(t, x), self.prediction_type)

    def _distilled_x0(self, x: Tensor, times: Tensor, cond: Tensor) -> Tensor:
        """x̂0 = x_t - t v in one call of the distilled transformer, conditioned on the prompt
        alone, as its pipeline runs it (SD 3.5 Large Turbo at guidance 0, FLUX.1 schnell
        without guidance); a guidance-distilled one is given the run's guidance as input."""
        net = self._consistency_net
        if net is None:
            raise SqdfError(f"sd: no consistency model (task_params.lcm) for {self.family.label}")
        t, cond = times.clamp(min=0).to(self.device), cond.to(self.device)
        kwargs = (self.distilled_text or self.text).unet_kwargs(cond)
        if self.family.packed and net.config.guidance_embeds:
            kwargs["guidance"] = torch.full((len(t),), self.options.guidance, device=t.device)
        with self._autocast():
            v = self._denoise(net, x.to(self.dtype), t, kwargs)
        return flow_x0(v.float(), x, _expand(t, x))

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [0, 1], (B, 3, H, W), differentiable; unscaled as the family's
        pipeline unscales them, in float32 where it upcasts the VAE."""
        config = self.vae.config
        dtype = torch.float32 if self.vae_upcast else self.dtype
        latents = latents.to(self.device, dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if self.family.latent_mean_std and mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            mean = torch.tensor(mean).view(shape).to(latents)
            std = torch.tensor(std).view(shape).to(latents)
            latents = latents * std / config.scaling_factor + mean
        elif self.family.latent_shift:
            latents = latents / config.scaling_factor + config.shift_factor
        else:
            latents = latents / config.scaling_factor
        if self.vae_upcast:
            with self._no_autocast():
                img = self.vae.decode(latents)
        else:
            with self._autocast():
                img = self.vae.decode(latents)
        return (img.sample.float() / 2 + 0.5).clamp(0, 1)

    @property
    def reference_compat(self) -> bool:
        """Whether the run reproduces the SQDF reference code's quirks (task_params)."""
        return self.options.reference_compat

    def reward_input(self, x0: Tensor) -> Tensor:
        """The decoded image in [0, 1]: what evaluation scores, reference_compat or not."""
        return self.decode(x0)

    def trained_reward_input(self, x0: Tensor) -> Tensor:
        """What the training reward scores: the decoded image, or with reference_compat the
        reference code's (mapped to [0, 1] twice, resized bilinearly): that quirk is the
        trained reward's alone, so a compat run's evaluation compares with any other run's."""
        images = self.reward_input(x0)
        return reference_code_image(images) if self.options.reference_compat else images

    def eval_reward(self, x0: Tensor, cond: Tensor | None) -> Tensor:
        if not self.options.reference_compat:
            return self.reward(x0, cond)
        prompts = self.reward_conditions(cond)
        images = self.reward_input(x0)
        with self._autocast():
            return self.reward_model(images, prompts).float()

    def prompts_of(self, cond: Tensor) -> list[str]:
        return [self.prompts[int(i)] for i in cond]

    def reward_conditions(self, cond: Tensor | None) -> list[str]:
        if cond is None:
            raise SqdfError("task sd scores images with their prompts; cond is required")
        return self.prompts_of(cond)

    def reward(self, x0: Tensor, cond: Tensor | None) -> Tensor:
        prompts = self.reward_conditions(cond)
        images = self.trained_reward_input(x0)
        with self._autocast():
            return self.reward_model(images, prompts).float()

    def reward_with_parts(self, x0: Tensor, cond: Tensor | None) -> tuple[Tensor, dict]:
        if getattr(self.reward_model, "parts", None) is None:
            return self.reward(x0, cond), {}
        prompts = self.reward_conditions(cond)
        images = self.trained_reward_input(x0)
        with self._autocast():  # each reward in the run's precision, as reward() runs them
            parts = self.reward_model.parts(images, prompts)
            total = self.reward_model.combine(parts)
        return total.float(), {name: value.float() for name, value in parts.items()}

    @torch.no_grad()
    def decode_batches(self, latents: Tensor, batch: int = 8) -> Tensor:
        return torch.cat(
            [self.decode(latents[i : i + batch]).cpu() for i in range(0, len(latents), batch)]
        )

    def evaluate(
        self, samples: Tensor, ref_samples: Tensor, cond: Tensor, generator: torch.Generator
    ) -> dict:
        """Diversity (mean pairwise distance of image features: the reward's CLIP features
        where it has them, else 32×32 pixels) of the fine-tuned and reference samples."""
        out = {}
        for prefix, latents in (("eval_", samples), ("ref_eval_", ref_samples)):
            feats = self._features(self.decode_batches(latents))
            out[f"{prefix}diversity"] = float(torch.pdist(feats).mean()) if len(feats) > 1 else 0.0
        return out

    @torch.no_grad()
    def _features(self, images: Tensor) -> Tensor:
        clip = getattr(self.reward_model, "clip_model", None)
        if clip is not None:
            return torch.cat(
                [clip.image_features(images[i : i + 16]).cpu() for i in range(0, len(images), 16)]
            )
        small = torch.nn.functional.interpolate(images, size=(32, 32), mode="area")
        return small.flatten(1)

    def plot_samples(
        self, samples: Tensor, ref_samples: Tensor | None, cond: Tensor, path: Path
    ) -> None:
        from sqdf.infra.report import save_image_rows

        n = min(8, len(samples))
        rows = [("fine-tuned", self.decode_batches(samples[:n]))]
        if ref_samples is not None:
            rows.append(("reference", self.decode_batches(ref_samples[:n])))
        save_image_rows(rows, self.prompts_of(cond[:n]), path)

    def save_final(self, folder: Path, policy: dict[str, Tensor]) -> None:
        """The LoRA in diffusers format (the family's pipeline's ``load_lora_weights(folder)``),
        or the fully fine-tuned UNet as a diffusers folder ``folder/unet``
        (UNet2DConditionModel.from_pretrained)."""
        if self.nets.finetune == "lora":
            save_diffusers_lora(
                self.denoiser, self.options.lora_rank, self.options.lora_alpha, folder, self.family
            )
            return
        unet_dir = folder / "unet"
        unet_dir.mkdir(parents=True, exist_ok=True)
        self.denoiser.save_config(str(unet_dir))
        save_weights(policy, unet_dir / "diffusion_pytorch_model.safetensors")


# the reward's input side in the SQDF reference code (T2I/alignprop_trainer.py lines 109 and
# 166/171: target_size = 224 for HPSv2 and the aesthetic scorer)
REFERENCE_REWARD_SIDE = 224


def tf32_applies(device: torch.device) -> bool:
    """Whether ``device``'s matrix products read torch's TF32 switch (CUDA's)."""
    return device.type == "cuda"


def apply_tf32(tf32: bool, device: torch.device) -> None:
    """torch's process-wide TF32 switch for matrix products (the reference code's
    allow_tf32; cuDNN's stays as is), set either way by every task built on CUDA, so that a
    task without tf32 does not run under an earlier one's (sqdf compare, the demo, Python)."""
    if tf32_applies(device):
        torch.backends.cuda.matmul.allow_tf32 = tf32


def reference_code_image(images: Tensor, side: int = REFERENCE_REWARD_SIDE) -> Tensor:
    """What the SQDF reference code's rewards see of a decoded image in [0, 1], (B, 3, H, W):
    mapped to [0, 1] a second time (x/2 + 1/2, so [0.5, 1]: T2I/alignprop_trainer.py line 173,
    after the pipeline's postprocess of sd_pipeline.py line 1139), then the shorter side
    resized to ``side`` bilinearly, without a crop (torchvision's Resize(224) on a tensor,
    antialiased). Differentiable."""
    x = (images / 2 + 0.5).clamp(0, 1)
    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    other = int(side * long / short)  # torchvision's rounding of the longer side
    size = (side, other) if h <= w else (other, side)
    return torch.nn.functional.interpolate(
        x, size=size, mode="bilinear", align_corners=False, antialias=True
    )


def lcm_distilled_timesteps(folder: Path) -> Tensor:
    """The timesteps a latent consistency model of this model was distilled at: diffusers'
    LCMScheduler on the model's noise schedule, at its ``original_inference_steps`` (50: 19,
    39, ..., 999 on 1,000 training steps), in its descending order. The SQDF reference code
    builds this scheduler from the pipeline's config (T2I/sd_pipeline.py line 1711) and at
    its 50 sampling steps takes exactly these (line 1005)."""
    from diffusers import LCMScheduler

    sched = load_part(LCMScheduler, folder, "scheduler")
    sched.set_timesteps(sched.config.original_inference_steps)
    return sched.timesteps.long().cpu()


def save_diffusers_lora(
    net: Any, rank: int, alpha: float, folder: Path, family: Family = FAMILIES["sd"]
) -> Path:
    """The policy adapter on the denoiser ``net`` as ``pytorch_lora_weights.safetensors``,
    written by the family's pipeline class (what its ``load_lora_weights`` reads: a UNet's in
    diffusers' key names, SD3's transformer's in peft's, as diffusers' LoRA scripts save
    them). diffusers reads a LoRA without metadata at scale 1 (alpha = rank), so alpha/rank is
    folded into the B matrices."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(net, adapter_name=POLICY_ADAPTER)
    scale = alpha / rank
    state = {k: (v * scale if "lora_B" in k else v).float().contiguous() for k, v in state.items()}
    if family.denoiser == "unet":
        state = convert_state_dict_to_diffusers(state)
    family.pipeline_class().save_lora_weights(
        str(folder), **{f"{family.denoiser}_lora_layers": state}
    )
    return Path(folder) / "pytorch_lora_weights.safetensors"


def flow_kernel(
    folder: Path, num_steps: int, options: SDConfig, family: Family
) -> tuple[FlowKernel, int]:
    """The flow SDE over the time grid the family's pipeline steps through (its scheduler's
    ``set_timesteps``: SD3's static shift, or the dynamic shift by the image's token count
    where the config says use_dynamic_shifting; FLUX's sigmas linspace(1, 1/N, N) always with
    that shift), and the factor from t to the model's time input (SD3: num_train_timesteps;
    FLUX: 1, as its pipeline divides the scheduler's timesteps by 1000)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
        calculate_shift,
    )

    sched = load_part(FlowMatchEulerDiscreteScheduler, folder, "scheduler")
    config = sched.config
    shift: dict[str, Any] = {}
    if family.packed:  # as FluxPipeline.__call__: mu by the packed sequence's length
        side = latent_shape(options)[-1] // 2
        shift["mu"] = calculate_shift(
            side * side, config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )  # fmt: skip
        if not config.get("use_flow_sigmas"):
            shift["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
    elif config.get("use_dynamic_shifting"):  # as StableDiffusion3Pipeline.__call__ computes mu
        side = latent_shape(options)[-1] // int(read_config(folder, family.denoiser)["patch_size"])
        shift["mu"] = calculate_shift(
            side * side, config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )  # fmt: skip
    sched.set_timesteps(num_steps, **shift)
    try:
        kernel = FlowKernel(
            sched.sigmas.float().cpu(), options.noise_level, options.noise_level_end
        )
    except ValueError as err:
        raise ConfigError(
            f"sd: {folder}/scheduler ({FLOW_SCHEDULER}) at {num_steps} steps: {err}"
        ) from None
    return kernel, 1 if family.packed else int(config.num_train_timesteps)


# the device the run computes on, while its SDConfig is built (build_sd, a dry run): which
# variant of the weights to fetch is decided from it, not from whether this machine has a GPU
_RUN_DEVICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("run_device", default=None)


@contextlib.contextmanager
def run_device(device: str | torch.device) -> Iterator[None]:
    """Within it, an SDConfig fetches the weights variant a run on ``device`` loads."""
    token = _RUN_DEVICE.set(str(device))
    try:
        yield
    finally:
        _RUN_DEVICE.reset(token)


def half_weights(dtype: str, device: str | None) -> bool:
    """Whether a run with task dtype ``dtype`` on ``device`` computes in 16 bits (its fp16
    weights variant is fetched where there is one): a 16-bit dtype, or auto on a CUDA device
    (bfloat16 there, float32 on the CPU); ``device`` None or "auto" is CUDA where this machine
    has it, as resolve_device picks."""
    if dtype != "auto":
        return dtype in ("bfloat16", "float16")
    if device is None or device == "auto":
        return torch.cuda.is_available()
    return str(device).startswith("cuda")


def build_sd(cfg: Any, reward: Any, device: torch.device) -> SDTask:
    with run_device(device):
        options = build_settings(SDConfig, cfg.task_params, "task 'sd'")
    family = family_of(options.model)
    if family.flow and cfg.eta != 1.0:
        raise ConfigError(
            f"eta is DDIM's; the flow SDE's noise ({family.label}) is task_params.noise_level "
            f"(got eta {cfg.eta})"
        )
    if getattr(reward, "domain", None) not in ("rgb", "image", "pixels", "any"):
        raise ConfigError(
            "task 'sd' needs an image reward (aesthetic, pickscore, clipscore, hpsv2, "
            "imagereward, jpeg or module:function)"
        )
    return SDTask(cfg, options, reward, device)
