"""Rebuild the shipped digits base model: DDPM training of the class-conditional UNet."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from sqdf.assets.digits_data import load_digits
from sqdf.errors import ConfigError
from sqdf.tasks.digits_model import (
    IMAGE_SIZE,
    NULL_CLASS,
    SCHEDULE,
    make_digits_unet,
    to_model_space,
)


@dataclass
class PretrainConfig:
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    ema_decay: float = 0.999
    label_dropout: float = 0.1  # trains the null class too, so guidance is available
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"pretrain: steps, batch_size and lr must be positive, got {self}")
        if not 0 <= self.label_dropout < 1 or not 0 <= self.ema_decay < 1:
            raise ConfigError("pretrain: label_dropout and ema_decay must be in [0, 1)")


def scheduler_config() -> DDIMScheduler:
    """The sampler config shipped beside the UNet (steps_offset=1, final alpha-bar < 1)."""
    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def pretrain_digits(
    out: str | Path, cfg: PretrainConfig, progress: bool = True, device: str = "cpu"
) -> Path:
    """Train the digits UNet with the epsilon loss; save the EMA weights as a diffusers folder."""
    out = Path(out)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    images, labels = load_digits(IMAGE_SIZE)
    # Randomness is drawn on the CPU, so the data order and noise are the same on any device.
    data = to_model_space(images)
    unet = make_digits_unet().train().to(device)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05
    )
    abar = scheduler_config().alphas_cumprod.to(device)
    t0 = time.perf_counter()
    losses = []
    for _ in tqdm(range(cfg.steps), desc="pretrain digits", disable=not progress):
        idx = torch.randint(0, data.shape[0], (cfg.batch_size,), generator=g)
        x0, y = data[idx], labels[idx].clone()
        y[torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout] = NULL_CLASS
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (cfg.batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x0, y, t, eps = (v.to(device) for v in (x0, y, t, eps))
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(unet(xt, t, class_labels=y).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
    ema.copy_to(unet.parameters())
    unet = unet.cpu()
    out.mkdir(parents=True, exist_ok=True)
    unet.eval().save_pretrained(str(out / "unet"), safe_serialization=True)
    scheduler_config().save_pretrained(str(out / "scheduler"))
    write_train_log(out / "unet" / "train_log.json", asdict(cfg), t0, losses, device)
    return out


def write_train_log(path: Path, config: dict, t0: float, losses: list[float], device: str) -> None:
    """The log shipped beside a model: its settings, where it ran, how long, its final loss."""
    log = {
        "config": config,
        "wall_s": round(time.perf_counter() - t0, 1),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "final_loss_mean_last_200": sum(losses[-200:]) / min(200, len(losses)),
    }
    path.write_text(json.dumps(log, indent=1))
