"""The model card of a finished run: RUN/final/README.md with the Hub's YAML metadata (written
by huggingface_hub's ModelCardData), so that ``hf upload REPO_ID RUN/final`` makes a model
page. Its numbers are the run's own metrics.jsonl rows, named as such; a number the run did
not measure is written as unmeasured."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from sqdf.config import TrainConfig
from sqdf.run import read_metrics

CARD = "README.md"
GRID = "samples.png"
# a Hub repository id as the Hub spells one (org/name), not a path on this machine
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MEASURES = (
    ("reward_mean", "reward (mean over the update's fresh batch)"),
    ("kl_mean", "KL to the reference (the update's estimate, summed over dimensions)"),
)


def base_model_of(cfg: TrainConfig) -> str | None:
    """The base model's Hub id when the run names one (not a local folder), else None."""
    model = cfg.task_params.get("model")
    if not isinstance(model, str) or Path(model).expanduser().exists():
        return None
    repo = model.split("@", 1)[0]
    return repo if _REPO_ID.match(repo) else None


def base_licence(cfg: TrainConfig) -> str | None:
    """The licence the base model's own card declares (its README.md metadata), or None."""
    from huggingface_hub import metadata_load

    model = cfg.task_params.get("model")
    card = Path(str(model)).expanduser() / CARD if isinstance(model, str) else None
    if card is None or not card.is_file():
        return None
    try:
        licence = (metadata_load(card) or {}).get("license")
    except Exception:  # a base card that does not parse leaves the licence unknown
        return None
    return licence if isinstance(licence, str) else None


def before_after(rows: list[dict[str, Any]], key: str) -> tuple[Any, Any]:
    """``key`` at the run's first and last logged update (None: not measured)."""
    values = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not values:
        return None, None
    return values[0], values[-1]


def _number(value: tuple[int, float] | None) -> str:
    return "unmeasured" if value is None else f"{value[1]:.6g} (update {value[0]})"


def measured(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The card's numbers, for its metadata (``sqdf_metrics``): each measure at the first and
    the last logged update, or 'unmeasured'."""
    out: dict[str, Any] = {}
    for key, _ in _MEASURES:
        first, last = before_after(rows, key)
        if first is None or last is None:
            out[key] = "unmeasured"
        else:
            out[key] = {"first_update": first[0], "first": first[1],
                        "last_update": last[0], "last": last[1]}  # fmt: skip
    return out


def card_metadata(cfg: TrainConfig, reward: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The Hub metadata: base model (a Hub id only), library, licence, tags, and the run's
    reward and KL (``measured``)."""
    from huggingface_hub import ModelCardData

    tags = ["sqdf", cfg.method, reward]
    if cfg.task != "gmm2d" and cfg.task_params.get("finetune", "lora") == "lora":
        tags.insert(0, "lora")
    data = ModelCardData(
        base_model=base_model_of(cfg),
        library_name="diffusers" if cfg.task != "gmm2d" else None,  # gmm2d: a small MLP
        license=base_licence(cfg),
        tags=list(dict.fromkeys(tags)),
        sqdf_metrics=measured(rows),
    )
    return data.to_dict()


def write_model_card(
    folder: Path, run: Path, cfg: TrainConfig, reward: str, command: str | None
) -> Path:
    """``folder``/README.md for the run in ``run`` (its settings ``cfg``, its reward's name
    ``reward``, the ``command`` that started it where known), with the run's newest training
    picture beside it as samples.png where it drew one."""
    from huggingface_hub import ModelCard, ModelCardData

    rows = read_metrics(run)
    pictures = sorted((run / "samples").glob("step_*.png"))
    if pictures:
        shutil.copyfile(pictures[-1], folder / GRID)
    meta = card_metadata(cfg, reward, rows)
    lines = [f"# {cfg.method} fine-tune of {cfg.task_params.get('model', cfg.task)} on {reward}",
             "", "Fine-tuned with sqdf (Soft Q-based Diffusion Fine-tuning): a reward "
             "fine-tune KL-regularised to the base model.", ""]  # fmt: skip
    lines += [
        "## Command",
        "",
        "```",
        command or "unrecorded (not started by sqdf train)",
        "```",
        "",
    ]
    lines += ["## Reward and KL", "", "From the run's metrics.jsonl (training batches, not a "
              "held-out evaluation; `sqdf eval RUN` measures one):", "",
              "| quantity | first update | last update |", "| --- | --- | --- |"]  # fmt: skip
    for key, label in _MEASURES:
        first, last = before_after(rows, key)
        lines.append(f"| {label} | {_number(first)} | {_number(last)} |")
    lines += ["", "## Samples", ""]
    if pictures:
        lines.append(f"![samples]({GRID}) (`{pictures[-1].name}`, drawn during training)")
    else:
        lines.append("No sample grid: the run drew none during training (`--sample-every N` "
                     "draws them; `sqdf sample` renders one after).")  # fmt: skip
    lines += ["", "## Settings", "", "```json", json.dumps(cfg.to_dict(), indent=1), "```"]
    if cfg.task == "sd" and "lora" in meta["tags"]:
        base = meta.get("base_model", cfg.task_params.get("model"))
        lines += ["", "## Use", "", "```python", "from diffusers import DiffusionPipeline", "",
                  f"pipe = DiffusionPipeline.from_pretrained({base!r})",
                  "pipe.load_lora_weights(\"THIS_REPO_OR_FOLDER\")", "```"]  # fmt: skip
    yaml = ModelCardData(**meta).to_yaml()
    card = ModelCard(f"---\n{yaml}\n---\n\n" + "\n".join(lines) + "\n")
    path = folder / CARD
    card.save(path)
    return path
