"""The shipped configs of each family at full size (sqdf/assets/model_configs/*.json, each
with its source), written out as a config-only model folder that the sd task's checks and
:mod:`sqdf.cost.parts` read as they read a downloaded one. No weights."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from sqdf.errors import ConfigError

MODELS = ("sd15", "sdxl", "sd35m", "sd35l", "fluxdev")  # the benchmark's table
# shipped for the presets' offline plans (FLUX.1-dev's x̂0 network, flux-schnell-aesthetic)
OTHERS = ("fluxschnell",)
REWARD_CLIP = "clip-vit-large-patch14"


def read_shipped(name: str) -> dict[str, Any]:
    """One shipped config file: ``source``, and the model's components or the CLIP's config."""
    if name not in (*MODELS, *OTHERS, REWARD_CLIP):
        raise ConfigError(f"no shipped config {name!r}; known: {', '.join((*MODELS, *OTHERS))}")
    text = resources.files("sqdf.assets").joinpath("model_configs", f"{name}.json").read_text()
    return json.loads(text)


def shipped_for(given: str) -> str | None:
    """The shipped config named for the Hub repository that ``given`` refers to (any revision),
    or None: what a dry run traces offline when that repository is not in the cache."""
    from sqdf.infra.weights import parse_hub_ref

    ref = parse_hub_ref(given)
    if ref is None or ref.path is not None:
        return None
    return _shipped_repo(ref.repo)


def _shipped_repo(repo: str) -> str | None:
    for name in (*MODELS, *OTHERS):
        if read_shipped(name).get("repo", "").lower() == repo.lower():
            return name
    return None


def shipped_component_for(given: str) -> tuple[str, str] | None:
    """(shipped config, component folder) for a Hub reference to a component folder of a
    repository sqdf ships configs for (``black-forest-labs/FLUX.1-schnell@REV/transformer``),
    or None."""
    from sqdf.infra.weights import parse_hub_ref

    ref = parse_hub_ref(given)
    if ref is None or ref.path is None:
        return None
    name = _shipped_repo(ref.repo)
    sub = ref.path.strip("/")
    if name is None or sub not in read_shipped(name)["components"]:
        return None
    return name, sub


def write_config_folder(name: str, dest: str | Path) -> Path:
    """A diffusers pipeline folder of configs alone for model ``name``: model_index.json,
    each component's config.json, the scheduler's config and empty tokenizer folders."""
    shipped = read_shipped(name)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "model_index.json").write_text(json.dumps(shipped["model_index"]))
    for sub, config in shipped["components"].items():
        (dest / sub).mkdir(exist_ok=True)
        (dest / sub / "config.json").write_text(json.dumps(config))
    (dest / "scheduler").mkdir(exist_ok=True)
    (dest / "scheduler" / "scheduler_config.json").write_text(json.dumps(shipped["scheduler"]))
    for sub in shipped["tokenizers"]:
        (dest / sub).mkdir(exist_ok=True)
    return dest


def reward_clip() -> tuple[dict[str, Any], list[int]]:
    """CLIP ViT-L/14's config and the LAION aesthetic head's layer widths."""
    shipped = read_shipped(REWARD_CLIP)
    return shipped["config"], list(shipped["head"])
