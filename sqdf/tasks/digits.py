"""The embedded image task: class-conditional 16×16 digits from a shipped diffusers UNet.

The class is the prompt. The policy is a peft LoRA on the base UNet, the reference the same
UNet with the adapter off (or, with ``finetune = "full"``, the whole UNet trains and the
reference is a frozen copy). x̂0 comes from the reference (Tweedie) or from the shipped
consistency model. Rewards score pixels in [0, 1]; the independent evaluator (an MNIST CNN
from another project) judges naturalness and diversity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from sqdf.config.params import build_settings
from sqdf.core.kernel import DDIMKernel
from sqdf.core.x0 import consistency_x0
from sqdf.errors import ConfigError, SqdfError
from sqdf.tasks.base import Task, _expand, schedule_of
from sqdf.tasks.digits_model import (
    IMAGE_SIZE,
    NUM_CLASSES,
    cfg_eps,
    load_unet,
    to_pixels,
)
from sqdf.tasks.finetune import PolicyAndReference, check_network_options


def shipped_model() -> Path:
    return Path(str(resources.files("sqdf.assets") / "digits"))


@dataclass
class DigitsConfig:
    """Where the models are and how the policy adapts them."""

    model: str | None = None  # folder with unet/, scheduler/ (default: the shipped model)
    cm: str | None = None  # consistency-model folder (default: MODEL/cm)
    guidance: float = 1.0  # classifier-free guidance scale; 1 = plain conditional model
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_targets: list = dataclasses.field(
        default_factory=lambda: ["conv1", "conv2", "time_emb_proj"]
    )
    classes: list | None = None  # conditions to train on (default: all ten digits)
    finetune: str = "lora"  # lora, or full (every UNet weight; what FSDP shards)
    compile: bool = False  # torch.compile the UNet (docs/performance.md: a long first update)
    channels_last: bool = False  # channels-last UNet weights

    def __post_init__(self) -> None:
        check_network_options(self.finetune, self.compile, self.channels_last, "digits")
        if self.guidance < 1.0:
            raise ConfigError(f"digits guidance must be >= 1, got {self.guidance}")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ConfigError(
                "digits lora_rank must be >= 1 and lora_alpha > 0, "
                f"got {self.lora_rank}, {self.lora_alpha}"
            )
        if self.classes is not None and (
            not self.classes or any(c not in range(NUM_CLASSES) for c in self.classes)
        ):
            raise ConfigError(f"digits classes must be digits 0-9, got {self.classes}")


class DigitsTask(Task):
    sample_shape = (1, IMAGE_SIZE, IMAGE_SIZE)
    eval_samples = 1000
    picture_samples = 40  # four of each class

    def __init__(self, cfg: Any, options: DigitsConfig, reward: Any, device: torch.device):
        self.options = options
        self.estimator = cfg.estimator
        self.reward_model = reward
        self.device = device
        folder = Path(options.model) if options.model else shipped_model()
        sched_dir = folder / "scheduler"
        if not (sched_dir / "scheduler_config.json").is_file():
            raise SqdfError(f"digits model: no scheduler/scheduler_config.json in {folder}")
        sched = DDIMScheduler.from_pretrained(str(sched_dir))
        if sched.config.prediction_type != "epsilon":
            raise SqdfError(
                f"digits model: expected an epsilon model, got {sched.config.prediction_type}"
            )
        self.schedule = schedule_of(sched, cfg.num_steps, cfg.eta, "digits model")
        self.kernel = DDIMKernel(self.schedule, "epsilon")
        unet = load_unet(folder / "unet", "digits base model").to(device)
        self.nets = PolicyAndReference(
            unet, options.finetune, options.lora_rank, options.lora_alpha,
            list(options.lora_targets),
        )  # fmt: skip
        self.unet = unet
        self.policy = self.nets.policy
        self.shardable = self.nets.shardable
        self.nets.speed_up(compile=options.compile, channels_last=options.channels_last)
        self._cm_dir = Path(options.cm) if options.cm else folder / "cm"

    @cached_property
    def cm(self) -> torch.nn.Module:
        return load_unet(self._cm_dir, "digits consistency model").to(self.device)

    def sample_conditions(self, n: int, generator: torch.Generator) -> Tensor:
        classes = torch.tensor(self.options.classes or list(range(NUM_CLASSES)))
        return classes[torch.randint(0, classes.shape[0], (n,), generator=generator)]

    def model_output(self, x: Tensor, timesteps: Tensor, cond: Tensor, *, policy: bool) -> Tensor:
        t, cond = timesteps.clamp(min=0).to(self.device), cond.to(self.device)
        with self.nets.network(policy=policy) as net:
            return cfg_eps(net, x, t, cond, self.options.guidance)

    def consistency_x0(self, x: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        t, cond = timesteps.clamp(min=0).to(self.device), cond.to(self.device)
        abar = _expand(self.schedule.abar(timesteps.cpu()), x).to(x)
        out = self.cm(x, t, class_labels=cond).sample
        return consistency_x0(out, x, abar, _expand(t, x))

    def reward_input(self, x0: Tensor) -> Tensor:
        return to_pixels(x0)

    def evaluate(
        self, samples: Tensor, ref_samples: Tensor, cond: Tensor, generator: torch.Generator
    ) -> dict:
        from sqdf.evaluators import DigitEvaluator

        judge = DigitEvaluator.load()
        ours = judge.metrics(to_pixels(samples), cond)
        ref = judge.metrics(to_pixels(ref_samples), cond)
        real = judge.real_digit_metrics()  # the yardstick: what real digits score
        return {
            **{f"eval_{k}": v for k, v in ours.items()},
            **{f"ref_eval_{k}": v for k, v in ref.items()},
            **{f"real_eval_{k}": real[k] for k in ("agreement", "confidence", "diversity")},
        }

    def plot_samples(
        self, samples: Tensor, ref_samples: Tensor | None, cond: Tensor, path: Path
    ) -> None:
        from sqdf.infra.report import save_digit_grid

        panels = [("fine-tuned", samples)] + (
            [("reference", ref_samples)] if ref_samples is not None else []
        )
        save_digit_grid([(name, to_pixels(x), cond) for name, x in panels], path)


def build_digits(cfg: Any, reward: Any, device: torch.device) -> DigitsTask:
    options = build_settings(DigitsConfig, cfg.task_params, "task 'digits'")
    if getattr(reward, "domain", None) not in ("image", "pixels", "any"):
        raise ConfigError(
            "task 'digits' needs an image reward (ink, classifier, jpeg or module:function)"
        )
    return DigitsTask(cfg, options, reward, device)
