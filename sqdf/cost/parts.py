"""The sd task's networks on the meta device, from a model folder's configs alone (no
weights read): the same diffusers and transformers classes, LoRA, checkpointing and call
path (:class:`sqdf.tasks.sd.SDTask`'s own methods) as a run, so a trace of them is a trace
of the run's graph.

Weights are made in the run's compute dtype. The LoRA too: on a GPU its products run
under autocast in that dtype; its float32 master weights, their gradients and AdamW's two
moments (16 bytes a trainable parameter) are counted apart (:func:`trainable_state_bytes`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sqdf.config.params import build_settings
from sqdf.config.train_config import TrainConfig
from sqdf.errors import ConfigError
from sqdf.infra.weights import names_a_file
from sqdf.rewards.clip_rewards import CLIP_MEAN, CLIP_STD, AestheticReward, ClipModel
from sqdf.tasks.base import schedule_of
from sqdf.tasks.finetune import PolicyAndReference
from sqdf.tasks.lora import enable_adapter_aware_checkpointing
from sqdf.tasks.quantize import quantize_base, tensor_bytes
from sqdf.tasks.sd import (
    DTYPES,
    SDConfig,
    SDTask,
    flow_kernel,
    latent_shape,
    lcm_distilled_timesteps,
    vae_upcast,
)
from sqdf.tasks.sd_family import distilled_transformer, family_of, read_config
from sqdf.tasks.sd_text import T5_LENGTH, PromptConditioning, flux_t5_length

META = torch.device("meta")
CLIP_LENGTH = 77  # every family's CLIP tokenizers pad to 77
TRAINABLE_STATE_BYTES = 16  # float32 weight, gradient and AdamW's two moments


@contextmanager
def made_on_meta(dtype: torch.dtype) -> Any:
    """Modules built inside have meta weights in ``dtype`` (set as the default dtype while
    building: ``.to(dtype)`` of a meta module is not needed and stays cheap)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with META:
            yield
    finally:
        torch.set_default_dtype(before)


def compute_dtype(options: SDConfig, on_gpu: bool = True) -> torch.dtype:
    """The run's weights and autocast dtype: as SDTask resolves it, planned for a GPU."""
    if options.dtype == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return DTYPES[options.dtype]


@dataclass
class MetaParts:
    """The meta task and what a trace needs beside it."""

    task: SDTask
    networks: dict[str, nn.Module]  # every network on the GPU during training, by role
    text_encoder_bytes: int  # the text encoders' weights, held only while prompts are encoded
    trainable: int  # parameters the optimizer updates


def _conditioning(family: Any, net_config: dict, dtype: torch.dtype) -> PromptConditioning:
    """One prompt's and its negative's conditioning, at the shapes the family's encoders give."""
    if family.packed:
        length, pooled = flux_t5_length(net_config), int(net_config["pooled_projection_dim"])
    elif family.flow:
        length, pooled = CLIP_LENGTH + T5_LENGTH, int(net_config["pooled_projection_dim"])
    elif family.size_ids:  # SDXL: the pooled projection beside 6 size ids in the time embedding
        time_dim = int(net_config["addition_time_embed_dim"])
        length = CLIP_LENGTH
        pooled = int(net_config["projection_class_embeddings_input_dim"]) - 6 * time_dim
    else:
        length, pooled = CLIP_LENGTH, 0
    width = int(net_config.get("joint_attention_dim") or net_config["cross_attention_dim"])
    with META:
        embeds = torch.zeros(1, length, width, dtype=dtype)
        pooled_t = torch.zeros(1, pooled, dtype=dtype) if pooled else None
        return PromptConditioning(
            embeds=embeds, pooled=pooled_t, negative_embeds=embeds.clone(),
            negative_pooled=None if pooled_t is None else pooled_t.clone(),
            negative_of=torch.zeros(1, dtype=torch.long),
            time_ids=torch.zeros(6, dtype=dtype) if family.size_ids else None,
            pooled_projections=family.flow,
        )  # fmt: skip


def _text_encoder_bytes(folder: Path, family: Any, dtype: torch.dtype) -> int:
    """Bytes of the folder's text encoders' weights in ``dtype`` (those it has)."""
    import transformers

    total = 0
    for sub, cls in zip(family.text_encoders, family.text_encoder_classes, strict=True):
        if not (folder / sub / "config.json").is_file():
            continue  # SD3 without T5
        model_cls = getattr(transformers, cls)
        config = model_cls.config_class.from_pretrained(str(folder / sub))
        with made_on_meta(dtype):
            model = model_cls(config)
        total += sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
    return total


def meta_clip_reward(clip_config: dict, head: list[int], dtype: torch.dtype) -> AestheticReward:
    """The LAION aesthetic reward (CLIP image features through its linear head) on meta:
    the reward's own ``__call__`` and preprocessing, over a meta CLIPModel."""
    from transformers import CLIPConfig, CLIPModel

    with made_on_meta(dtype):
        model = CLIPModel(CLIPConfig(**clip_config))
    model.requires_grad_(False).train()  # train mode: checkpointing acts only there
    clip = ClipModel.__new__(ClipModel)
    size = int(clip_config["vision_config"]["image_size"])
    clip.model, clip.size, clip.mean, clip.std = model, size, CLIP_MEAN, CLIP_STD
    reward = AestheticReward.__new__(AestheticReward)
    reward.__dict__["clip_model"] = clip
    with META:
        reward._layers = [
            (torch.zeros(o, i), torch.zeros(o)) for i, o in zip(head, head[1:], strict=False)
        ]
    return reward


def meta_sd_task(
    cfg: TrainConfig, clip_config: dict, head: list[int], *, on_gpu: bool = True
) -> MetaParts:
    """The sd task of ``cfg`` on the meta device, built from its model folder's configs, with
    the aesthetic reward of ``clip_config`` (the reward the trace scores with)."""
    from diffusers import AutoencoderKL, DDIMScheduler

    options = build_settings(SDConfig, cfg.task_params, "task 'sd'")
    folder = Path(options.model)
    family = family_of(folder)
    dtype = compute_dtype(options, on_gpu)
    task = SDTask.__new__(SDTask)
    task.family, task.options, task.estimator, task.device = family, options, cfg.estimator, META
    task.dtype = dtype
    task._autocast = nullcontext  # the weights are in the compute dtype already
    task._no_autocast = nullcontext  # (meta has no autocast; nothing to turn off)
    task.sample_shape = latent_shape(options)
    if family.flow:
        task.schedule = None
        task.kernel, task.time_scale = flow_kernel(folder, cfg.num_steps, options, family)
    else:
        sched = DDIMScheduler.from_config(DDIMScheduler.load_config(str(folder / "scheduler")))
        task.prediction_type = sched.config.prediction_type
        task.schedule = schedule_of(sched, cfg.num_steps, cfg.eta, "sd")
        from sqdf.core.kernel import DDIMKernel

        task.kernel = DDIMKernel(task.schedule, task.prediction_type)
    net_config = read_config(folder, family.denoiser)
    with made_on_meta(dtype):
        task.denoiser = family.denoiser_model().from_config(net_config)
    quantize_base(task.denoiser, options.quantize_base)  # torchao's int8 tensors, on meta
    vae_config = read_config(folder, "vae")
    task.vae_upcast = vae_upcast(family, dtype, vae_config)  # the task's own rule
    with made_on_meta(torch.float32 if task.vae_upcast else dtype):
        task.vae = AutoencoderKL.from_config(vae_config)
    task.guidance_input = family.packed and bool(task.denoiser.config.guidance_embeds)
    del task.vae.encoder
    if options.vae_slicing:
        task.vae.enable_slicing()
    task.vae.requires_grad_(False)
    task.text = _conditioning(family, net_config, dtype)
    with made_on_meta(dtype):
        task.nets = PolicyAndReference(
            task.denoiser, "lora", options.lora_rank, options.lora_alpha, list(options.lora_targets)
        )
    task.policy = task.nets.policy
    task._consistency_net = None
    task.distilled_text, task.distilled_length = None, None
    # the x̂0 call's timesteps as SDTask reads them (the LCM's own grid, or the chain's)
    task.lcm_grid = (
        lcm_distilled_timesteps(folder)
        if options.lcm_timesteps == "distilled" and not family.flow
        else None
    )
    networks: dict[str, nn.Module] = {"denoiser": task.denoiser, "VAE decoder": task.vae}
    lcm = options.lcm
    # a plan's LCM that is neither here nor downloadable (offline): an LCM-LoRA file is left
    # out of the trace anyway (below), a network is not guessed
    if cfg.estimator == "consistency" and lcm and not Path(lcm).exists():
        if not names_a_file(str(lcm)):
            raise ConfigError(
                f"the consistency model {lcm} is not in the Hub cache and the Hub cannot be "
                "reached, so its network cannot be sized"
            )
    if cfg.estimator == "consistency" and options.lcm and Path(options.lcm).is_dir():
        # a second network: an LCM UNet, or a distilled transformer (an LCM-LoRA file is an
        # adapter on the reference's weights: the reference runs without it, its rank-64
        # products and few MB of weights left out)
        # a flow family's may be given as its pipeline's folder, as the task takes it
        where = distilled_transformer(options.lcm, folder, family) if family.flow else options.lcm
        with made_on_meta(dtype):
            lcm = family.denoiser_model().from_config(read_config(Path(where), "."))
        task._consistency_net = lcm.requires_grad_(False)
        quantize_base(lcm, options.quantize_base)
        networks["x̂0 model"] = lcm
        # FLUX.1 schnell as FLUX.1-dev's x̂0 network reads its own, shorter T5 states
        if family.packed and flux_t5_length(lcm.config) != flux_t5_length(net_config):
            task.distilled_text = _conditioning(family, dict(lcm.config), dtype)
            task.distilled_length = task.distilled_text.embeds.shape[1]
    reward = meta_clip_reward(clip_config, head, dtype)
    task.reward_model = reward
    networks["reward"] = reward.clip_model.model
    if options.gradient_checkpointing:
        enable_adapter_aware_checkpointing(task.denoiser)
        if task._consistency_net is not None:
            task._consistency_net.enable_gradient_checkpointing()
        task.vae.enable_gradient_checkpointing()
        reward.enable_checkpointing()
    trainable = sum(p.numel() for p in task.denoiser.parameters() if p.requires_grad)
    return MetaParts(task, networks, _text_encoder_bytes(folder, family, dtype), trainable)


def weight_bytes(modules: list[nn.Module]) -> int:
    """Bytes of the modules' parameters and buffers (each storage once; a quantised weight's
    int8 data and scales)."""
    seen: dict[int, int] = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            seen[id(t)] = tensor_bytes(t)
    return sum(seen.values())


def linear_weight_bytes(module: nn.Module) -> int:
    """Bytes of the frozen nn.Linear weights of ``module``, as held: in the loaded dtype, or
    int8 data, scales and zero points under ``quantize_base = "int8"`` (half the bf16 bytes
    and 5 bytes a row)."""
    return sum(
        tensor_bytes(m.weight)
        for m in module.modules()
        if type(m) is nn.Linear and not m.weight.requires_grad
    )


def trainable_state_bytes(trainable: int) -> int:
    """The optimizer's side of training: float32 weights, gradients, AdamW's two moments."""
    return trainable * TRAINABLE_STATE_BYTES


def sample_numel(task: SDTask) -> int:
    return math.prod(task.sample_shape)
