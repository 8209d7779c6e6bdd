"""Prompt conditioning for the UNet families, encoded once when the task is built, exactly
as each family's diffusers pipeline builds it (its ``encode_prompt``, and for SDXL its
``_get_add_time_ids``), then looked up by prompt index during training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sqdf.errors import ConfigError
from sqdf.tasks.sd_family import Family, load_part, read_config, zero_negative_for_empty

TOKENIZER_LIMIT = 10_000  # transformers reports 1e30 for a tokenizer saved without a length


@dataclass
class PromptConditioning:
    """Every prompt's conditioning and its negative's (CFG's unconditional branch).

    embeds: (P, L, D) text hidden states per prompt index;
    pooled: (P, E) pooled text projections (SDXL; None for SD 1.x/2.x);
    negative_embeds, negative_pooled: (N, L, D), (N, E) for the N distinct negatives (most
    often one), and negative_of: (P,) the row of each prompt's negative;
    time_ids: (6,) original size, crop top-left, target size (SDXL; None otherwise).
    """

    embeds: Tensor
    pooled: Tensor | None
    negative_embeds: Tensor
    negative_pooled: Tensor | None
    negative_of: Tensor
    time_ids: Tensor | None = None

    def rows(self, cond: Tensor, *, negative: bool = False) -> tuple[Tensor, Tensor | None]:
        """(hidden states, pooled or None) of prompt indices ``cond`` (B,), or their
        negatives'."""
        if negative:
            rows = self.negative_of.to(cond.device)[cond]
            pooled = None if self.negative_pooled is None else self.negative_pooled[rows]
            return self.negative_embeds[rows], pooled
        return self.embeds[cond], None if self.pooled is None else self.pooled[cond]

    def unet_kwargs(self, cond: Tensor, *, negative: bool = False) -> dict[str, Any]:
        """The UNet's conditioning keywords for prompt indices ``cond`` (B,)."""
        embeds, pooled = self.rows(cond, negative=negative)
        kwargs: dict[str, Any] = {"encoder_hidden_states": embeds}
        if pooled is not None:
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
        )

    def guided_kwargs(self, cond: Tensor) -> dict[str, Any]:
        """Negative then positive conditioning in one batch of 2B, as the pipelines batch
        classifier-free guidance."""
        return _cat(self.unet_kwargs(cond, negative=True), self.unet_kwargs(cond))


def _cat(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: _cat(v, b[k]) if isinstance(v, dict) else torch.cat([v, b[k]]) for k, v in a.items()}


def load_tokenizer(folder: Path, sub: str, encoder: str) -> Any:
    """A CLIP tokenizer with a usable ``model_max_length``: without one, transformers reports
    a huge sentinel and padding to it fails deep inside the tokenizer."""
    from transformers import CLIPTokenizer

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


def encode_prompts(
    family: Family,
    folder: Path,
    prompts: list[str],
    negatives: list[str],
    device: torch.device,
    dtype: torch.dtype,
) -> PromptConditioning:
    """Each prompt's conditioning and its negative's (``negatives[i]`` for ``prompts[i]``;
    "" is no negative prompt: the encoded empty string, or zeros where SDXL's
    ``force_zeros_for_empty_prompt`` says so). Distinct negatives are encoded once; the text
    encoders are let go on return. ``time_ids`` is left to :func:`sdxl_time_ids`."""
    tokenizers = [
        load_tokenizer(folder, sub, enc)
        for sub, enc in zip(family.tokenizers, family.text_encoders, strict=True)
    ]
    encoders = [
        load_part(family.text_encoder_class(i), folder, sub, use_safetensors=True, dtype=dtype)
        .to(device)
        for i, sub in enumerate(family.text_encoders)
    ]  # fmt: skip
    embeds, pooled = _encode(family, encoders, tokenizers, prompts, device)
    distinct = list(dict.fromkeys(negatives))
    neg, neg_pooled = _encode(family, encoders, tokenizers, distinct, device)
    if family.pooled and zero_negative_for_empty(folder) and "" in distinct:
        empty = distinct.index("")
        neg[empty] = 0.0
        neg_pooled[empty] = 0.0
    negative_of = torch.tensor([distinct.index(n) for n in negatives])
    return PromptConditioning(embeds, pooled, neg, neg_pooled, negative_of)


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
