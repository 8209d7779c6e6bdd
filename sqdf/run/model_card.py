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

from sqdf.config.train_config import TrainConfig
from sqdf.infra.atomic import atomic_write, atomic_write_text
from sqdf.infra.weights import COMMIT, HubRef, parse_hub_ref
from sqdf.run.folder import config_path, read_metrics

CARD = "README.md"
GRID = "samples.png"
_MEASURES = (
    ("reward_mean", "reward (mean over the update's fresh batch)"),
    ("kl_mean", "KL to the reference (the update's estimate, summed over dimensions)"),
)


def base_model_of(cfg: TrainConfig) -> str | None:
    """The base model's Hub repository when the run names one (``org/name``, pinned, a folder
    in it, ``hf://``), not a local folder; else None."""
    ref = _base_ref(cfg)
    return None if ref is None else ref.repo


def _base_ref(cfg: TrainConfig) -> HubRef | None:
    model = cfg.task_params.get("model")
    if not isinstance(model, str) or Path(model).expanduser().exists():
        return None  # a local path that exists always wins, as when the run loaded it
    return parse_hub_ref(model)


def base_commit(run: Path, cfg: TrainConfig) -> str | None:
    """The commit of the base model's repository the run trained on (its config.json's record
    of resolved weights), or None where it recorded none."""
    model = cfg.task_params.get("model")
    try:
        weights = json.loads(config_path(run).read_text()).get("weights") or {}
    except (OSError, ValueError):
        return None
    record = weights.get(model) if isinstance(weights, dict) else None
    commit = record.get("commit") if isinstance(record, dict) else None
    return commit if isinstance(commit, str) and COMMIT.fullmatch(commit) else None


def base_licence(cfg: TrainConfig, commit: str | None = None) -> str | None:
    """The licence the base model's own card declares (its README.md metadata): a local
    folder's, or a Hub repository's at ``commit`` (else the revision given) from the Hub cache
    (fetched where online; offline and not cached it is unknown). None: unknown."""
    from huggingface_hub import hf_hub_download, metadata_load

    model = cfg.task_params.get("model")
    if not isinstance(model, str):
        return None
    ref = _base_ref(cfg)
    try:
        if ref is None:
            card = Path(model).expanduser() / CARD
        else:
            card = Path(hf_hub_download(ref.repo, CARD, revision=commit or ref.revision))
        licence = (metadata_load(card) or {}).get("license") if card.is_file() else None
    except Exception:  # offline and not cached, no card, a card that does not parse: unknown
        return None
    return licence if isinstance(licence, str) else None


def reward_tags(reward: str) -> list[str]:
    """Hub tags for a reward: one per component of a mixture (``aesthetic=1,hpsv2#a=0.5`` ->
    aesthetic, hpsv2), a ``module:function`` by its function, each in lower case with '-'
    for anything but letters and digits."""
    from sqdf.rewards.mixture import parse_mixture, reward_of

    names = [reward_of(n) for n in parse_mixture(reward) or {}] or [reward]
    tags = []
    for name in names:
        slug = re.sub(r"[^a-z0-9]+", "-", name.rpartition(":")[2].lower()).strip("-")
        tags.append(slug or "custom-reward")
    return list(dict.fromkeys(tags))


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


def card_metadata(
    cfg: TrainConfig, reward: str, rows: list[dict[str, Any]], commit: str | None = None
) -> dict[str, Any]:
    """The Hub metadata: base model (a Hub id only), library, licence (the base's card at
    ``commit``), tags, and the run's reward and KL (``measured``)."""
    from huggingface_hub import ModelCardData

    tags = ["sqdf", cfg.method, *reward_tags(reward)]
    if cfg.task != "gmm2d" and cfg.task_params.get("finetune", "lora") == "lora":
        tags.insert(0, "lora")
    data = ModelCardData(
        base_model=base_model_of(cfg),
        library_name="diffusers" if cfg.task != "gmm2d" else None,  # gmm2d: a small MLP
        license=base_licence(cfg, commit),
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
        atomic_write(folder / GRID, lambda tmp: shutil.copyfile(pictures[-1], tmp))
    commit = base_commit(run, cfg)
    meta = card_metadata(cfg, reward, rows, commit)
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
    lines += [
        "",
        "## Licence",
        "",
        "The base model's: "
        + (
            meta.get("license")
            or "unknown (its model card was not found, or is not in the Hub cache offline)"
        ),
    ]
    if cfg.task == "sd" and "lora" in meta["tags"]:
        base = meta.get("base_model", cfg.task_params.get("model"))
        ref = _base_ref(cfg)
        revision = commit or (ref.revision if ref is not None else None)
        pinned = f", revision={revision!r}" if revision and "base_model" in meta else ""
        lines += ["", "## Use", "", "```python", "from diffusers import DiffusionPipeline", "",
                  f"pipe = DiffusionPipeline.from_pretrained({base!r}{pinned})",
                  "pipe.load_lora_weights(\"THIS_REPO_OR_FOLDER\")", "```"]  # fmt: skip
    yaml = ModelCardData(**meta).to_yaml()
    card = ModelCard(f"---\n{yaml}\n---\n\n" + "\n".join(lines) + "\n")
    path = folder / CARD
    atomic_write_text(path, str(card))  # push writes it into a finished final/: whole or not
    return path
