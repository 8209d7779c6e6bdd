"""Consistency distillation of the digits base model (the sharper x̂0 estimator for the soft Q).

Latent-consistency-style: the student f(x, t) = c_skip(t) x + c_out(t) x̂0_student(x, t) is
trained so that f(x_t, t) matches the EMA target's f at the point the frozen teacher's
deterministic DDIM step (a probability-flow ODE solver) reaches from x_t at t - skip. Below
the first skip the boundary condition f(x, 0) = x gives the target directly.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from sqdf.assets.digits_data import load_digits
from sqdf.core.x0 import consistency_x0, predict_x0_and_eps
from sqdf.errors import ConfigError
from sqdf.pretraining.pretrain import scheduler_config, write_train_log
from sqdf.tasks.digits_model import IMAGE_SIZE, SCHEDULE, load_unet, to_model_space


@dataclass
class DistillConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-4
    skip: int = 20  # teacher ODE step in train timesteps (a 50-step grid)
    target_ema: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.skip < 1:
            raise ConfigError(f"distill-cm: steps, batch_size, lr, skip must be positive: {self}")
        if not 0 <= self.target_ema < 1:
            raise ConfigError(f"distill-cm: target_ema must be in [0, 1), got {self.target_ema}")


def distill_cm(
    base: str | Path,
    out: str | Path,
    cfg: DistillConfig,
    progress: bool = True,
    device: str = "cpu",
) -> Path:
    """Distil ``base``/unet into a consistency model saved as a diffusers folder at ``out``."""
    out = Path(out)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    teacher = load_unet(Path(base) / "unet", "teacher (base model)").to(device)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    target = EMAModel(student.parameters(), decay=cfg.target_ema)
    target_net = copy.deepcopy(teacher)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    images, labels = load_digits(IMAGE_SIZE)
    data = to_model_space(images)
    abar_all = scheduler_config().alphas_cumprod.to(device)
    n_train = SCHEDULE["num_train_timesteps"]
    t0 = time.perf_counter()
    losses = []
    for _ in tqdm(range(cfg.steps), desc="distill consistency model", disable=not progress):
        idx = torch.randint(0, data.shape[0], (cfg.batch_size,), generator=g)
        x0, y = data[idx].to(device), labels[idx].to(device)
        t = torch.randint(1, n_train, (cfg.batch_size,), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        prev = t - cfg.skip
        a_t = abar_all[t].view(-1, 1, 1, 1)
        a_prev = abar_all[prev.clamp(min=0)].view(-1, 1, 1, 1)
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
        with torch.no_grad():
            x0_teacher, eps_teacher = predict_x0_and_eps(
                teacher(x_t, t, class_labels=y).sample, x_t, a_t
            )
            x_prev = a_prev.sqrt() * x0_teacher + (1 - a_prev).sqrt() * eps_teacher
            target.copy_to(target_net.parameters())
            pc = prev.clamp(min=0)
            f_target = consistency_x0(
                target_net(x_prev, pc, class_labels=y).sample, x_prev, a_prev, pc.view(-1, 1, 1, 1)
            )
            # below the first skip the target is the boundary f(x, 0) = x
            f_target = torch.where((prev <= 0).view(-1, 1, 1, 1), x_prev, f_target)
        f_student = consistency_x0(
            student(x_t, t, class_labels=y).sample, x_t, a_t, t.view(-1, 1, 1, 1)
        )
        loss = F.mse_loss(f_student, f_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        target.step(student.parameters())
        losses.append(loss.item())
    target.copy_to(student.parameters())
    student = student.cpu()
    out.mkdir(parents=True, exist_ok=True)
    student.eval().save_pretrained(str(out), safe_serialization=True)
    write_train_log(out / "train_log.json", asdict(cfg), t0, losses, device)
    return out
