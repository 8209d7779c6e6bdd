"""Stable Diffusion (the UNet families: SD 1.x/2.x and SDXL) from a local diffusers folder,
fine-tuned as a peft LoRA on its UNet.

The family is read from the folder's ``model_index.json`` (sqdf.tasks.sd_family); prompts are
encoded once as that family's pipeline encodes them (sqdf.tasks.sd_text) and the text
encoders are then let go. The reference is the same UNet with the adapter off (one copy of
the weights); with ``finetune = "full"`` every UNet weight trains and the reference is a
frozen copy. x̂0 comes from the reference UNet (Tweedie) or from a latent consistency model:
an LCM UNet folder, or an LCM-LoRA loaded beside the policy's adapter on the base UNet. Only
x̂0 latents are decoded by the VAE (with gradients) for the reward; the trajectory stays in
latent space.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sqdf.checkpoint import save_weights
from sqdf.core.kernel import DDIMKernel
from sqdf.core.x0 import consistency_x0, guidance_embedding
from sqdf.errors import ConfigError, SqdfError
from sqdf.params import build_settings
from sqdf.tasks.base import Task, _expand, schedule_of
from sqdf.tasks.finetune import PolicyAndReference, check_network_options
from sqdf.tasks.lora import (
    POLICY_ADAPTER,
    activate_only,
    enable_adapter_aware_checkpointing,
    is_policy_weight,
    only_adapter,
)
from sqdf.tasks.sd_family import (
    FAMILIES,
    Family,
    check_lora_fits,
    check_unet_fits,
    family_of,
    load_part,
    read_config,
)
from sqdf.tasks.sd_prompts import load_prompt_pairs, load_prompts
from sqdf.tasks.sd_text import encode_prompts, sdxl_time_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LCM_ADAPTER = "lcm"


@dataclass
class SDConfig:
    """The model folder, prompts, guidance, LoRA, consistency model and memory settings."""

    model: str | None = None  # diffusers pipeline folder (SD 1.x/2.x or SDXL; model_index.json)
    prompts: str = "animals"  # a built-in set (animals, varied) or a file, one prompt a line
    # prompts the run does not train on, for sqdf eval and --eval-every (a set or a file)
    eval_prompts: str = "animals-heldout"
    # CFG's unconditional prompt (a prompts-file line may set its own); "" is none, which
    # SDXL pipelines encode as zeros
    negative_prompt: str = ""
    guidance: float = 5.0  # classifier-free guidance scale (1 = no guidance)
    resolution: int | None = None  # image side in pixels (default: the UNet's native size)
    lora_rank: int = 4  # as in the SQDF reference implementation
    lora_alpha: float = 4.0
    lora_targets: list = dataclasses.field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"]
    )
    lcm: str | None = None  # LCM UNet folder, or LCM-LoRA .safetensors (estimator consistency)
    lcm_guidance: float = 8.0  # w for an LCM UNet with a guidance embedding (time_cond_proj_dim)
    dtype: str = "auto"  # weights and autocast: auto (bfloat16 on CUDA, float32 on CPU) or a name
    gradient_checkpointing: bool = True  # UNet, VAE decoder and reward model
    finetune: str = "lora"  # lora, or full (every UNet weight, in float32; what FSDP shards)
    compile: bool = False  # torch.compile the UNet(s)
    channels_last: bool = False  # channels-last UNet weights

    def __post_init__(self) -> None:
        check_network_options(self.finetune, self.compile, self.channels_last, "sd")
        if not self.model:
            raise ConfigError(
                "task 'sd' needs a local Stable Diffusion folder: --model PATH "
                "(or task_params.model)"
            )
        family_of(self.model)  # a folder of another family, or incomplete, fails here
        if self.guidance < 1.0:
            raise ConfigError(f"sd guidance must be >= 1, got {self.guidance}")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ConfigError(
                f"sd lora_rank must be >= 1 and lora_alpha > 0, got {self.lora_rank}, "
                f"{self.lora_alpha}"
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(
                f"sd dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}"
            )
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ConfigError(f"sd resolution must be a multiple of 8, got {self.resolution}")
        if self.lcm is not None and not Path(self.lcm).exists():
            raise ConfigError(f"sd lcm: no such folder or file {self.lcm!r}")
        load_prompts(self.prompts)  # a bad prompt set fails here, not mid-run
        load_prompts(self.eval_prompts)


def _sizes(options: SDConfig) -> tuple[int, int, int]:
    """(latent channels, image side in pixels, VAE downscaling factor) from the unet/ and
    vae/ configs alone."""
    folder = Path(options.model)
    unet, vae = read_config(folder, "unet"), read_config(folder, "vae")
    try:
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        side = options.resolution or int(unet["sample_size"]) * factor
        channels = int(unet["in_channels"])
    except (KeyError, TypeError) as err:
        raise SqdfError(
            f"{folder}: unet/config.json or vae/config.json lacks a usable {err} (a diffusers "
            "UNet2DConditionModel and AutoencoderKL config have them)"
        ) from None
    if side % factor:
        raise ConfigError(f"sd resolution {side} is not a multiple of the VAE's {factor}")
    return channels, side, factor


def image_side(options: SDConfig) -> int:
    """The side in pixels of the images trained on: ``options.resolution``, else the UNet's
    native size."""
    return _sizes(options)[1]


def latent_shape(options: SDConfig) -> tuple[int, int, int]:
    """(channels, side, side) of the latents the UNet denoises at :func:`image_side`."""
    channels, side, factor = _sizes(options)
    return (channels, side // factor, side // factor)


class SDTask(Task):
    eval_samples = 64
    eval_batch = 8
    picture_samples = 4

    def __init__(self, cfg: Any, options: SDConfig, reward: Any, device: torch.device):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        if cfg.estimator == "consistency" and not options.lcm:  # before loading gigabytes
            raise ConfigError(
                "sd: estimator consistency needs task_params.lcm (an LCM UNet folder or an "
                "LCM-LoRA file); or use estimator tweedie"
            )
        self.options = options
        self.estimator = cfg.estimator
        self.reward_model = reward
        self.device = device
        if options.dtype == "auto":
            self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            self.dtype = DTYPES[options.dtype]
        folder = Path(options.model)
        self.family: Family = family_of(folder)
        sched = load_part(DDIMScheduler, folder, "scheduler")
        self.prediction_type = sched.config.prediction_type
        self.schedule = schedule_of(sched, cfg.num_steps, cfg.eta, "sd")
        self.kernel = DDIMKernel(self.schedule, self.prediction_type)
        safe = {"use_safetensors": True, "dtype": self.dtype}
        self.unet = load_part(UNet2DConditionModel, folder, "unet", **safe).to(device)
        vae_config = read_config(folder, "vae")
        # decode in float32 where the family's pipeline does (SDXL's VAE overflows float16)
        self.vae_upcast = (
            self.family.upcast_vae_in_float16
            and self.dtype == torch.float16
            and bool(vae_config.get("force_upcast", True))
        )
        vae_dtype = torch.float32 if self.vae_upcast else self.dtype
        self.vae = load_part(AutoencoderKL, folder, "vae", use_safetensors=True, dtype=vae_dtype)
        del self.vae.encoder  # only x̂0 latents are decoded; nothing is encoded
        self.vae.to(device).requires_grad_(False)
        pairs = load_prompt_pairs(options.prompts)
        self.prompts = [p for p, _ in pairs]
        self.train_prompts = len(pairs)  # training draws from these; later ones are held out
        self.negatives = [options.negative_prompt if n is None else n for _, n in pairs]
        self.text = encode_prompts(
            self.family, folder, self.prompts, self.negatives, device, self.dtype
        )
        self.sample_shape = latent_shape(options)
        if self.family.pooled:
            self.text.time_ids = sdxl_time_ids(
                self.unet, self.text.pooled.shape[-1], image_side(options), folder
            ).to(device)

        self.nets = PolicyAndReference(
            self.unet, options.finetune, options.lora_rank, options.lora_alpha,
            list(options.lora_targets),
        )  # fmt: skip
        for p in self.unet.parameters():
            if p.requires_grad:  # trainable weights are float32 whatever the loaded dtype
                p.data = p.data.to(device, torch.float32)
        self.policy = self.nets.policy
        self.shardable = self.nets.shardable
        self._lcm_unet = None
        if options.lcm:
            self._attach_lcm(Path(options.lcm))
        if options.gradient_checkpointing:
            for net in self.nets.networks:
                enable_adapter_aware_checkpointing(net)
            self.vae.enable_gradient_checkpointing()
            clip = getattr(reward, "clip_model", None)
            if clip is not None:
                clip.enable_checkpointing()
        # after checkpointing is set up, so that compile sees the blocks as they will run
        self.nets.speed_up(compile=options.compile, channels_last=options.channels_last)
        if hasattr(reward, "to"):
            reward.to(device)

    def _attach_lcm(self, path: Path) -> None:
        from diffusers import UNet2DConditionModel

        if path.is_dir():
            check_unet_fits(read_config(path.parent, path.name), self.unet, path, self.family.label)
            self._lcm_unet = load_part(
                UNet2DConditionModel, path.parent, path.name, use_safetensors=True,
                dtype=self.dtype,
            )  # fmt: skip
            self._lcm_unet.to(self.device, self.dtype).requires_grad_(False)
            return
        # on the pretrained weights: the reference network (under LoRA, the policy's own)
        base = self.nets.reference_net
        state, alphas = self.family.pipeline_class().lora_state_dict(str(path))
        check_lora_fits(state, base, path, self.family.label)
        with warnings.catch_warnings():  # peft warns of a second adapter: that is the point
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            base.load_lora_adapter(
                state, prefix="unet", network_alphas=alphas, adapter_name=LCM_ADAPTER
            )
        for name, p in base.named_parameters():  # the LCM-LoRA is frozen
            p.requires_grad_(base is self.unet and is_policy_weight(name))
        # peft activates an adapter it loads; the LCM-LoRA runs only in consistency_x0: under
        # LoRA the policy's adapter stays the active one, a full reference copy has none
        activate_only(base, POLICY_ADAPTER if base is self.unet else None)

    def _autocast(self) -> Any:
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

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
            folder = Path(self.options.model)
            more = encode_prompts(
                self.family, folder, [p for p, _ in new], [n for _, n in new], self.device,
                self.dtype,
            )  # fmt: skip
            for pair in new:
                known[pair] = len(self.prompts)
                self.prompts.append(pair[0])
                self.negatives.append(pair[1])
            self.text = self.text.extended(more)
        return torch.tensor([known[(p, n)] for (p, _), n in zip(pairs, negatives, strict=True)])

    def _eps(self, unet: Any, x: Tensor, t: Tensor, cond: Tensor, guidance: float) -> Tensor:
        if guidance == 1.0:
            return unet(x.to(self.dtype), t, **self.text.unet_kwargs(cond)).sample
        # both halves of classifier-free guidance in one batched pass
        both = unet(
            torch.cat([x, x]).to(self.dtype), torch.cat([t, t]), **self.text.guided_kwargs(cond)
        ).sample
        uncond, c = both.chunk(2)
        return uncond + guidance * (c - uncond)

    def model_output(self, x: Tensor, timesteps: Tensor, cond: Tensor, *, policy: bool) -> Tensor:
        t, cond = timesteps.clamp(min=0).to(self.device), cond.to(self.device)
        with self._autocast():
            with self.nets.network(policy=policy) as net:
                out = self._eps(net, x, t, cond, self.options.guidance)
        return out.float()

    def consistency_x0(self, x: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        t, cond = timesteps.clamp(min=0).to(self.device), cond.to(self.device)
        abar = _expand(self.schedule.abar(timesteps.cpu()), x).to(x)
        text = self.text.unet_kwargs(cond)
        with self._autocast():
            if self._lcm_unet is not None:
                w_cond = None
                dim = self._lcm_unet.config.time_cond_proj_dim
                if dim is not None:
                    w = torch.full((x.shape[0],), self.options.lcm_guidance - 1.0)
                    w_cond = guidance_embedding(w, dim).to(self.device, self.dtype)
                out = self._lcm_unet(x.to(self.dtype), t, timestep_cond=w_cond, **text).sample
            else:
                base = self.nets.reference_net
                with only_adapter(base, LCM_ADAPTER):
                    out = base(x.to(self.dtype), t, **text).sample
        return consistency_x0(out.float(), x, abar, _expand(t, x), self.prediction_type)

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
        else:
            latents = latents / config.scaling_factor
        if self.vae_upcast:
            with torch.autocast(self.device.type, enabled=False):
                img = self.vae.decode(latents)
        else:
            with self._autocast():
                img = self.vae.decode(latents)
        return (img.sample.float() / 2 + 0.5).clamp(0, 1)

    def reward_input(self, x0: Tensor) -> Tensor:
        return self.decode(x0)

    def prompts_of(self, cond: Tensor) -> list[str]:
        return [self.prompts[int(i)] for i in cond]

    def reward_conditions(self, cond: Tensor | None) -> list[str]:
        if cond is None:
            raise SqdfError("task sd scores images with their prompts; cond is required")
        return self.prompts_of(cond)

    def reward(self, x0: Tensor, cond: Tensor | None) -> Tensor:
        prompts = self.reward_conditions(cond)
        images = self.reward_input(x0)
        with self._autocast():
            return self.reward_model(images, prompts).float()

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
        from sqdf.report import save_image_rows

        n = min(8, len(samples))
        rows = [("fine-tuned", self.decode_batches(samples[:n]))]
        if ref_samples is not None:
            rows.append(("reference", self.decode_batches(ref_samples[:n])))
        save_image_rows(rows, self.prompts_of(cond[:n]), path)

    def save_final(self, folder: Path, policy: dict[str, Tensor]) -> None:
        """The LoRA in diffusers format (StableDiffusionPipeline.load_lora_weights(folder)), or
        the fully fine-tuned UNet as a diffusers folder ``folder/unet``
        (UNet2DConditionModel.from_pretrained)."""
        if self.nets.finetune == "lora":
            save_diffusers_lora(
                self.unet, self.options.lora_rank, self.options.lora_alpha, folder, self.family
            )
            return
        unet_dir = folder / "unet"
        unet_dir.mkdir(parents=True, exist_ok=True)
        self.unet.save_config(str(unet_dir))
        save_weights(policy, unet_dir / "diffusion_pytorch_model.safetensors")


def save_diffusers_lora(
    unet: Any, rank: int, alpha: float, folder: Path, family: Family = FAMILIES["sd"]
) -> Path:
    """The policy adapter as ``pytorch_lora_weights.safetensors``, written by the family's
    pipeline class (what its ``load_lora_weights`` reads). diffusers reads a LoRA without
    metadata at scale 1 (alpha = rank), so alpha/rank is folded into the B matrices."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=POLICY_ADAPTER)
    scale = alpha / rank
    state = {k: (v * scale if "lora_B" in k else v).float().contiguous() for k, v in state.items()}
    family.pipeline_class().save_lora_weights(
        str(folder), unet_lora_layers=convert_state_dict_to_diffusers(state)
    )
    return Path(folder) / "pytorch_lora_weights.safetensors"


def build_sd(cfg: Any, reward: Any, device: torch.device) -> SDTask:
    options = build_settings(SDConfig, cfg.task_params, "task 'sd'")
    if getattr(reward, "domain", None) not in ("rgb", "image", "any"):
        raise ConfigError(
            "task 'sd' needs an image reward (aesthetic, pickscore, clipscore, hpsv2 or "
            "module:function)"
        )
    return SDTask(cfg, options, reward, device)
