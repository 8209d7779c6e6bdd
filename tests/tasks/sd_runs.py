"""What the SD 1.5 and SDXL tests share: the settings of a tiny sd run, and running a README
block of sd commands on tiny parts laid out under the names the README uses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from sqdf.cli import main
from sqdf.config import TrainConfig
from sqdf.settings import make_config

README = Path(__file__).resolve().parents[2] / "README.md"
# the README's commands made small enough for a test
QUICK = {
    "train": ["--num-steps", "3", "--steps", "2", "--batch-size", "2", "--grad-accum", "1",
              "--device", "cpu", "--no-progress"],
    "sample": ["--num-samples", "2", "--num-steps", "2", "--device", "cpu"],
}  # fmt: skip


def write_tiny_parts(root: Path, preset: str = "tiny") -> Path:
    """``root/sd`` (a random pipeline of ``preset``), ``root/clip`` and the aesthetic head
    as ``root/head.pth`` and ``root/head.safetensors``: what sd_settings(root / "sd", root)
    reads."""
    from sqdf.rewards.clip_rewards import convert_aesthetic_head
    from sqdf.tasks.sd_random import write_random_aesthetic_head, write_random_clip, write_random_sd

    write_random_sd(root / "sd", preset)
    write_random_clip(root / "clip")
    write_random_aesthetic_head(root / "head.pth", in_dim=16)
    convert_aesthetic_head(root / "head.pth", root / "head.safetensors")
    return root


def sd_settings(model: Path, parts: Path, **over: Any) -> dict[str, Any]:
    """A 4-step, 2-update sd run on ``model`` with the aesthetic reward of ``parts`` (its
    clip/ and head.safetensors); ``over`` replaces keys, task_params merge."""
    values = {
        "task": "sd", "device": "cpu", "num_steps": 4, "batch_size": 2, "steps": 2,
        "grad_accum": 1, "buffer": "uniform", "buffer_size": 8, "estimator": "tweedie",
        "lr": 1e-2,
        "task_params": {"model": str(model), "prompts": "varied", "guidance": 3.0},
        "reward_params": {"clip": str(parts / "clip"), "head": str(parts / "head.safetensors")},
    }  # fmt: skip
    for key, value in over.items():
        values[key] = {**values[key], **value} if key == "task_params" else value
    return values


def sd_config(model: Path, parts: Path, **over: Any) -> TrainConfig:
    return make_config(sd_settings(model, parts, **over), source="test")


def sd_pipeline(model: Path) -> Any:
    """The plain diffusers pipeline of ``model``'s family, loaded as a user would."""
    from sqdf.tasks.sd_family import family_of

    return family_of(model).pipeline_class().from_pretrained(str(model), local_files_only=True)


def readme_block(marker: str) -> list[str]:
    """The lines of the one README bash block that contains ``marker``."""
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
                if marker in b]  # fmt: skip
    return block.strip().splitlines()


def run_readme_lines(lines: list[str], layout: dict[str, Path], tmp_path: Path) -> None:
    """Run ``W=~/weights`` and the sqdf commands after it in ``tmp_path``, with $W a folder
    of links named as the README names the weights (``layout``: name -> tiny part)."""
    weights = tmp_path / "weights"
    weights.mkdir()
    for name, target in layout.items():
        (weights / name).symlink_to(target)
    assert lines[0] == "W=~/weights"
    for line in lines[1:]:
        argv = shlex.split(line.replace("$W", str(weights)))
        assert argv[0] == "sqdf"
        assert main(argv[1:] + QUICK.get(argv[1], [])) == 0, line
