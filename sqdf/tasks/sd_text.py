"""Prompt conditioning for the sd task's families, encoded once when the task is built,
exactly as each family's diffusers pipeline builds it (its ``encode_prompt``, and for SDXL its
``_get_add_time_ids``), then looked up by prompt index during training."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sqdf.errors import ConfigError
from sqdf.tasks.sd_family import (
    Family,
    absent_components,
    load_part,
    read_config,
    zero_negative_for_empty,
)

TOKENIZER_LIMIT = 10_000  # transformers reports 1e30 for a tokenizer saved without a length
T5_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length
FLUX_T5_LENGTH = 512  # FluxPipeline's default (and largest) max_sequence_length
# FLUX.1 schnell (no guidance embedding) was trained on at most 256 T5 tokens: its pipeline
# docs say max_sequence_length cannot be more than 256, so it is encoded at 256
FLUX_SCHNELL_T5_LENGTH = 256


def flux_t5_length(transformer_config: dict[str, Any]) -> int:
    """The T5 tokens a FLUX transformer is conditioned on, by its config: FLUX.1-dev's 512
    with a guidance embedding, FLUX.1 schnell's 256 without one."""
    return FLUX_T5_LENGTH if transformer_config.get("guidance_embeds") else FLUX_SCHNELL_T5_LENGTH


@dataclass
class PromptConditioning:
    """Every prompt's conditioning and its negative's (CFG's unconditional branch).

    embeds: (P, L, D) text hidden states per prompt index;
    pooled: (P, E) pooled text projections (SDXL, SD3; FLUX: CLIP-L's pooled output; None for
    SD 1.x/2.x);
    negative_embeds, negative_pooled: (N, L, D), (N, E) for the N distinct negatives (most
    often one), and negative_of: (P,) the row of each prompt's negative;
    time_ids: (6,) original size, crop top-left, target size (SDXL; None otherwise);
    pooled_projections: SD3's and FLUX's transformers take the pooled embedding as
    ``pooled_projections`` (SDXL's UNet takes it with the size ids in ``added_cond_kwargs``).
    """

    embeds: Tensor
    pooled: Tensor | None
    negative_embeds: Tensor
    negative_pooled: Tensor | None
    negative_of: Tensor
    time_ids: Tensor | None = None
    pooled_projections: bool = False

    def rows(self, cond: Tensor, *, negative: bool = False) -> tuple[Tensor, Tensor | None]:
        """(hidden states, pooled or None) of prompt indices ``cond`` (B,), or their
        negatives'."""
        if negative:
            rows = self.negative_of.to(cond.device)[cond]
            pooled = None if self.negative_pooled is None else self.negative_pooled[rows]
            return self.negative_embeds[rows], pooled
        return self.embeds[cond], None if self.pooled is None else self.pooled[cond]

    def unet_kwargs(self, cond: Tensor, *, negative: bool = False) -> dict[str, Any]:
        """The denoiser's conditioning keywords for prompt indices ``cond`` (B,): the UNet's, or
        SD3's transformer's."""
        embeds, pooled = self.rows(cond, negative=negative)
        kwargs: dict[str, Any] = {"encoder_hidden_states": embeds}
        if pooled is not None and self.pooled_projections:
            kwargs["pooled_projections"] = pooled
        elif pooled is not None:
            time_ids = self.time_ids.expand(len(cond), -1)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        return kwargs

    def extended(self, more: PromptConditioning) -> PromptConditioning:
        """This table with ``more``'s prompts appended (their indices follow this one's),
        for prompts encoded after the task was built (held-out evaluation)."""
        pooled = None if self.pooled is None else torch.cat([self.pooled, more.pooled])
        neg_pooled = self.negative_pooled
        if neg_pooled is not None:
            neg_pooled = torch.cat([neg_pooled, more.negative_pooled])
        return PromptConditioning(
            embeds=torch.cat([self.embeds, more.embeds]),
            pooled=pooled,
            negative_embeds=torch.cat([self.negative_embeds, more.negative_embeds]),
            negative_pooled=neg_pooled,
            negative_of=torch.cat([self.negative_of, more.negative_of + len(self.negative_embeds)]),
            time_ids=self.time_ids,
            pooled_projections=self.pooled_projections,
        )

    def guided_kwargs(self, cond: Tensor) -> dict[str, Any]:
        """Negative then positive conditioning in one batch of 2B, as the pipelines batch
        classifier-free guidance."""
        return _cat(self.unet_kwargs(cond, negative=True), self.unet_kwargs(cond))


def _cat(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: _cat(v, b[k]) if isinstance(v, dict) else torch.cat([v, b[k]]) for k, v in a.items()}


def load_tokenizer(folder: Path, sub: str, encoder: str, t5: bool = False) -> Any:
    """A CLIP tokenizer with a usable ``model_max_length``: without one, transformers reports
    a huge sentinel and padding to it fails deep inside the tokenizer. With ``t5``, SD3's T5
    tokenizer (padded to :data:`T5_LENGTH`, as the pipeline pads it, whatever it says)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    if t5:
        return load_part(T5TokenizerFast, folder, sub)
    tokenizer = load_part(CLIPTokenizer, folder, sub)
    if not 0 < tokenizer.model_max_length <= TOKENIZER_LIMIT:
        length = read_config(folder, encoder).get("max_position_embeddings", 77)
        raise ConfigError(
            f"{folder / sub}: the tokenizer has no usable model_max_length (transformers "
            f'reports {tokenizer.model_max_length}); add "model_max_length": {length} '
            f"(the text encoder's max_position_embeddings) to {folder / sub}/tokenizer_config.json"
        )
    return tokenizer


@torch.no_grad()
def _encode(
    family: Family,
    encoders: list[Any],
    tokenizers: list[Any],
    texts: list[str],
    device: torch.device,
) -> tuple[Tensor, Tensor | None]:
    """(hidden states (N, L, D), pooled (N, E) or None) for ``texts``, 32 at a time."""
    hidden, pooled = [], []
    for i in range(0, len(texts), 32):
        chunk, parts = texts[i : i + 32], []
        for encoder, tokenizer in zip(encoders, tokenizers, strict=True):
            ids = tokenizer(
                chunk, padding="max_length", max_length=tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids.to(device)  # fmt: skip
            if not family.pooled:  # SD 1.x/2.x: the last layer, after the final layer norm
                parts.append(encoder(ids)[0])
                continue
            out = encoder(ids, output_hidden_states=True)
            parts.append(out.hidden_states[-2])  # SDXL: every encoder's penultimate layer
            if encoder is encoders[-1]:
                pooled.append(out.text_embeds)
        hidden.append(torch.cat(parts, dim=-1))
    return torch.cat(hidden), torch.cat(pooled) if pooled else None


@torch.no_grad()
def _encode_sd3(
    encoders: list[Any],
    tokenizers: list[Any],
    texts: list[str],
    device: torch.device,
    t5_width: int,
) -> tuple[Tensor, Tensor]:
    """As StableDiffusion3Pipeline.encode_prompt: (hidden states (N, 77 + 256, W), pooled
    (N, E)). Both CLIPs' penultimate states side by side, zero-padded to T5's width W, then
    T5's states (zeros where the folder has no T5); pooled: both CLIPs' projections."""
    clip_length = tokenizers[0].model_max_length  # the pipeline pads both CLIPs to the first's
    hidden, pooled = [], []
    for i in range(0, len(texts), 32):
        chunk, states, projections = texts[i : i + 32], [], []
        for encoder, tokenizer in zip(encoders[:2], tokenizers[:2], strict=True):
            ids = tokenizer(
                chunk, padding="max_length", max_length=clip_length, truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)  # fmt: skip
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2].to(encoders[0].dtype))
            projections.append(out.text_embeds)
        clip = torch.cat(states, dim=-1)
        if len(encoders) == 3:
            ids = tokenizers[2](
                chunk, padding="max_length", max_length=T5_LENGTH, truncation=True,
                add_special_tokens=True, return_tensors="pt",
            ).input_ids.to(device)  # fmt: skip
            t5 = encoders[2](ids)[0]
        else:  # the pipeline's stand-in for T5 (text_encoder_3=None)
            t5 = torch.zeros((len(chunk), T5_LENGTH, t5_width), device=device, dtype=clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        hidden.append(torch.cat([clip, t5], dim=-2))
        pooled.append(torch.cat(projections, dim=-1))
    return torch.cat(hidden), torch.cat(pooled)


@torch.no_grad()
def _encode_flux(
    encoders: list[Any],
    tokenizers: list[Any],
    texts: list[str],
    device: torch.device,
    length: int,
) -> tuple[Tensor, Tensor]:
    """As FluxPipeline.encode_prompt at ``max_sequence_length=length``: (T5's last hidden
    states (N, length, W), CLIP-L's pooled output (N, E)); CLIP-L's hidden states are not
    used."""
    hidden, pooled = [], []
    for i in range(0, len(texts), 32):
        chunk = texts[i : i + 32]
        ids = tokenizers[0](
            chunk, padding="max_length", max_length=tokenizers[0].model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(device)  # fmt: skip
        pooled.append(
            encoders[0](ids, output_hidden_states=False).pooler_output.to(encoders[0].dtype)
        )
        ids = tokenizers[1](
            chunk, padding="max_length", max_length=length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)  # fmt: skip
        hidden.append(encoders[1](ids, output_hidden_states=False)[0].to(encoders[1].dtype))
    return torch.cat(hidden), torch.cat(pooled)


def encode_prompts(
    family: Family,
    folder: Path,
    prompts: list[str],
    negatives: list[str],
    device: torch.device,
    dtype: torch.dtype,
    t5_lengths: Sequence[int | None] = (None,),
) -> list[PromptConditioning]:
    """Each prompt's conditioning and its negative's (``negatives[i]`` for ``prompts[i]``;
    "" is no negative prompt: the encoded empty string, or zeros where SDXL's
    ``force_zeros_for_empty_prompt`` says so), once per FLUX T5 length in ``t5_lengths``
    (None: the model's own transformer's, :func:`flux_t5_length`; another transformer
    conditioned on the same encoders, FLUX.1 schnell as FLUX.1-dev's x̂0 network, reads its
    own), the other families the same at every entry. Distinct negatives are encoded once;
    the text encoders are loaded once and let go on return. ``time_ids`` is left to
    :func:`sdxl_time_ids`."""
    absent = absent_components(folder, family)
    present = [
        (i, sub, enc)
        for i, (sub, enc) in enumerate(zip(family.tokenizers, family.text_encoders, strict=True))
        if enc not in absent
    ]
    tokenizers = [
        load_tokenizer(folder, sub, enc, t5=family.text_encoder_classes[i] == "T5EncoderModel")
        for i, sub, enc in present
    ]
    encoders = [
        load_part(family.text_encoder_class(i), folder, enc, use_safetensors=True, dtype=dtype)
        .to(device)
        for i, _, enc in present
    ]  # fmt: skip
    own = flux_t5_length(read_config(folder, family.denoiser)) if family.packed else None
    width = (
        int(read_config(folder, family.denoiser)["joint_attention_dim"])
        if family.name == "sd3"
        else 0
    )

    def encode(texts: list[str], length: int | None) -> tuple[Tensor, Tensor | None]:
        if family.packed:
            return _encode_flux(encoders, tokenizers, texts, device, length or own)
        if family.name == "sd3":
            return _encode_sd3(encoders, tokenizers, texts, device, width)
        return _encode(family, encoders, tokenizers, texts, device)

    distinct = list(dict.fromkeys(negatives))
    negative_of = torch.tensor([distinct.index(n) for n in negatives])
    zeroed = family.zeros_for_empty_negative and zero_negative_for_empty(folder)
    empty = distinct.index("") if zeroed and "" in distinct else None
    out = []
    for length in t5_lengths:
        embeds, pooled = encode(prompts, length)
        neg, neg_pooled = encode(distinct, length)
        if empty is not None:
            neg[empty] = 0.0
            neg_pooled[empty] = 0.0
        out.append(
            PromptConditioning(
                embeds,
                pooled,
                neg,
                neg_pooled,
                negative_of,
                pooled_projections=family.denoiser == "transformer",
            )
        )
    return out


def sdxl_time_ids(unet: Any, pooled_dim: int, side: int, folder: Path) -> Tensor:
    """(6,) original size, crop top-left and target size of a ``side``-pixel square image,
    as the SDXL pipeline conditions on by default; checked against what the UNet's added
    embedding takes, as the pipeline checks."""
    ids = torch.tensor([side, side, 0, 0, side, side], dtype=torch.float32)
    expected = unet.add_embedding.linear_1.in_features
    given = unet.config.addition_time_embed_dim * len(ids) + pooled_dim
    if given != expected:
        raise ConfigError(
            f"task 'sd': {folder}/unet takes {expected} added conditioning values, but 6 "
            f"size/crop ids and text_encoder_2's {pooled_dim}-wide projection make {given} "
            "(an SDXL refiner UNet? only the base SDXL pipeline is supported)"
        )
    return ids
