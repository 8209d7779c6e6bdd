"""Tasks by name: each entry builds a Task from the TrainConfig, its reward and a device."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from sqdf.core.gaussian_q import MAX_DIM
from sqdf.core.kl import alpha_in_sum_convention
from sqdf.errors import ConfigError
from sqdf.tasks.base import GAUSSIAN_POSTERIOR, Task
from sqdf.tasks.gmm2d import GMM2DTask, build_gmm2d


def build_digits(cfg: Any, reward: Any, device: torch.device) -> Task:
    # imported on use: diffusers and peft take seconds to import, and gmm2d needs neither
    from sqdf.tasks.digits import build_digits as build

    return build(cfg, reward, device)


def build_sd(cfg: Any, reward: Any, device: torch.device) -> Task:
    from sqdf.tasks.sd import build_sd as build

    return build(cfg, reward, device)


TASKS = {"gmm2d": build_gmm2d, "digits": build_digits, "sd": build_sd}
DEFAULT_REWARDS = {"gmm2d": "linear", "digits": "ink", "sd": "aesthetic"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    return device


def resolved_reward_name(cfg: Any) -> str:
    return DEFAULT_REWARDS[cfg.task] if cfg.reward == "auto" else cfg.reward


def _plan_settings(cfg: Any) -> Any:
    """The settings dataclass of task gmm2d or sd, built as the task builds it (a bad value
    fails here as in a run); sd's under the run's device, whose weights variant it resolves."""
    from sqdf.config.params import build_settings

    if cfg.task == "gmm2d":
        from sqdf.tasks.gmm2d import GMM2DConfig

        return build_settings(GMM2DConfig, cfg.task_params, "task 'gmm2d'")
    from sqdf.tasks.sd import SDConfig, run_device

    with run_device(cfg.device):  # the weights variant of the run's device, not this machine's
        return build_settings(SDConfig, cfg.task_params, "task 'sd'")


def sample_shape(cfg: Any) -> tuple[int, ...]:
    """The shape of one sample of task ``cfg.task`` (an SD latent, a digit, a point), from
    settings and model configs only: no weights are loaded."""
    if cfg.task == "gmm2d":
        _plan_settings(cfg)  # a bad setting fails a plan as it fails a run
        return GMM2DTask.sample_shape
    if cfg.task == "digits":
        from sqdf.tasks.digits_model import IMAGE_SIZE

        return (1, IMAGE_SIZE, IMAGE_SIZE)
    if cfg.task != "sd":
        raise ConfigError(f"unknown task {cfg.task!r}; known: {', '.join(sorted(TASKS))}")
    from sqdf.tasks.sd import latent_shape

    return latent_shape(_plan_settings(cfg))


def on_flow_path(cfg: Any) -> bool:
    """Whether task ``cfg.task`` samples on the rectified-flow path (gmm2d's process flow,
    SD 3/3.5 and FLUX.1), from settings and model configs only: no weights are loaded."""
    if cfg.task == "gmm2d":
        return _plan_settings(cfg).process == "flow"
    if cfg.task != "sd":
        return False
    from sqdf.tasks.sd_family import family_of

    return family_of(_plan_settings(cfg).model).flow


def with_summed_alpha(cfg: Any) -> Any:
    """``cfg`` with alpha as the weight of the exact KL summed over a sample's dimensions (the
    convention every loss uses), converted from ``cfg.kl_scale`` with the task's own D."""
    if cfg.kl_scale == "sum":
        return cfg
    dims = math.prod(sample_shape(cfg))
    alpha = alpha_in_sum_convention(cfg.alpha, cfg.kl_scale, dims)
    return dataclasses.replace(cfg, alpha=alpha, kl_scale="sum")


def build_task(cfg: Any) -> Task:
    """The task named by ``cfg.task`` with its reward, on ``cfg.device`` (alpha in the summed
    convention, whatever ``cfg.kl_scale`` says)."""
    from sqdf.rewards import build_reward

    reward = build_reward(resolved_reward_name(cfg), cfg.reward_params)
    cfg = with_summed_alpha(cfg)
    dims = math.prod(sample_shape(cfg))
    if cfg.estimator == GAUSSIAN_POSTERIOR and cfg.q_cov == "full" and dims > MAX_DIM:
        raise ConfigError(
            f"estimator {GAUSSIAN_POSTERIOR!r} with q_cov 'full' reads the posterior covariance "
            f"with one backward pass per dimension, for samples of at most {MAX_DIM}; task "
            f"{cfg.task!r} has {dims}: use q_cov 'isotropic' (one backward pass), or tweedie "
            f"or consistency"
        )
    try:
        task = TASKS[cfg.task](cfg, reward, resolve_device(cfg.device))
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"task {cfg.task!r}: {err}") from None
    task.alpha, task.q_draws = cfg.alpha, cfg.q_draws
    task.q_cov, task.q_probes = cfg.q_cov, cfg.q_probes
    return task


__all__ = ["TASKS", "Task", "build_task", "resolve_device", "sample_shape", "with_summed_alpha"]
