"""The training configuration: one typed dataclass, validated once; the CLI reuses its help."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqdf.config.params import check_finite
from sqdf.core.kl import KL_SCALES
from sqdf.errors import ConfigError
from sqdf.infra.trackers import parse_log_with

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ESTIMATORS = ("tweedie", "consistency", "exact", "gaussian_posterior")
Q_COVARIANCES = ("full", "isotropic")
ROLLOUTS = ("full", "truncated")
BUFFER_STRATEGIES = ("uniform", "on_policy", "prioritized")
BUFFER_STORES = ("memory", "disk")
BUFFER_DTYPES = ("float32", "bfloat16", "float16", "auto")
BUFFER_SCOPES = ("process", "shared")
LR_SCHEDULES = ("constant", "cosine", "linear")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def users_params(reward: str, params: dict[str, Any]) -> set[str]:
    """The keys of ``params`` (reward_params) that belong to a user's ``module:function``
    reward, alone or as a part of a mixture (its ``NAME.KEY`` keys or ``NAME`` table). These
    are passed to the user's function as they are: infinity may mean "no limit" there, so
    they are not refused as non-finite (sqdf's own rewards' parameters are, when built)."""
    if ":" not in reward:
        return set()
    if "=" not in reward:  # one module:function: every parameter is its own
        return set(params)
    parts = [item.rpartition("=")[0].strip() for item in reward.split(",")]
    users = [part for part in parts if ":" in part.partition("#")[0]]
    return {key for key in params
            if any(key == part or key.startswith(part + ".") for part in users)}  # fmt: skip


@dataclass
class TrainConfig:
    """Everything a training run depends on; written to the run folder as config.json."""

    task: str = _f(
        "gmm2d",
        "task: backbone, conditions and metrics: gmm2d (the exact 2-D benchmark), digits (the "
        "shipped model), sd (Stable Diffusion 1.x/2.x, SDXL, SD 3/3.5, FLUX.1)",
    )
    method: str = _f(
        "sqdf", "fine-tuning method: sqdf, draft, draft_lv, draft_kl, refl, alignprop, ddpo, grpo"
    )
    reward: str = _f(
        "auto",
        "reward: linear, quadratic (gmm2d); ink, classifier (digits); aesthetic, pickscore, "
        "clipscore, hpsv2, imagereward (sd); jpeg (images, no gradient); module:function; "
        "NAME=WEIGHT,NAME=WEIGHT for a weighted sum; auto = the task's default",
    )
    reward_params: dict = _f(
        {}, "reward parameters, e.g. {b = [1.0, 0.0]} for linear; NAME.KEY for a mixture's"
    )
    task_params: dict = _f({}, "task parameters, e.g. {radius = 3.0} for gmm2d")
    method_params: dict = _f({}, "method parameters, e.g. {k = 1} for draft")
    alpha: float = _f(2.0, "KL weight alpha, in the convention kl_scale names")
    kl_scale: str = _f(
        "sum",
        "how alpha is written: sum = weight of the exact KL summed over a sample's D dimensions; "
        "mean = of mean((mu - mu_ref)^2 / sigma^2), as the SQDF reference code (alpha_sum = "
        "2 alpha / D); half_mean = of the mean with the 1/2, the exact KL per dimension "
        "(alpha / D); sigma is the step's std in all three (Flow-GRPO's beta is per step: "
        "grpo's kl_scale)",
    )
    gamma: float = _f(0.9, "discount gamma in (0, 1]: step k's reward is weighted gamma^(T-k-1)")
    estimator: str = _f(
        "consistency",
        "x̂0 estimator for the soft Q: tweedie or consistency; exact (gmm2d only): the "
        "closed-form soft value alpha log E[exp(r(x0)/alpha) | x_t], no x̂0; "
        "gaussian_posterior: alpha log-mean-exp of r/alpha over q_draws draws from a "
        "Gaussian with Tweedie's posterior mean and covariance (q_cov)",
    )
    q_draws: int = _f(16, "draws per soft value for estimator gaussian_posterior")
    q_cov: str = _f(
        "full",
        "estimator gaussian_posterior's covariance: full (the denoiser's Jacobian, one backward "
        "pass per dimension: samples of <= 64 dimensions) or isotropic (its trace by one "
        "q_probes Hutchinson probes: one backward pass each, any size)",
    )
    q_probes: int = _f(
        1,
        "q_cov isotropic: Hutchinson probes of the trace, one backward pass through the "
        "reference each (the trace's relative error falls as 1/sqrt(q_probes))",
    )
    num_steps: int = _f(50, "DDIM sampling steps T")
    eta: float = _f(1.0, "DDIM eta in (0, 1]; the KL needs a stochastic policy")
    steps: int = _f(300, "optimizer updates")
    batch_size: int = _f(128, "trajectories per fresh batch, and cells per micro-batch")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer update")
    lr: float = _f(1e-3, "AdamW learning rate (the peak, under a schedule)")
    lr_schedule: str = _f(
        "constant",
        "learning rate after the warm-up: constant, or a cosine or linear decay from lr to "
        "lr_min over the rest of the run's steps; a function of the update's index alone, so "
        "a resumed run follows it exactly (a decaying one cannot change steps on resume)",
    )
    lr_warmup: int = _f(0, "updates of linear learning-rate warm-up from 0 to lr")
    lr_min: float = _f(
        0.0, "the learning rate (absolute, not a fraction of lr) a cosine or linear decay ends at"
    )
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient-norm clip (0 disables)")
    buffer: str = _f("uniform", "replay strategy: uniform, on_policy or prioritized")
    buffer_size: int = _f(1024, "replay buffer capacity in trajectories")
    buffer_store: str = _f(
        "memory",
        "where the replay buffer's states live: memory (host RAM, saved in each checkpoint) or "
        "disk (memory-mapped files in RUN/buffer/, up to twice the buffer; checkpoints record "
        "which rows are valid instead of copying them)",
    )
    buffer_dtype: str = _f(
        "float32",
        "dtype of the replay buffer's states: float32, bfloat16 or float16 (half the bytes), "
        "auto = the model's dtype where the task has one (sd), else float32",
    )
    replay_ratio: int = _f(1, "optimizer updates per freshly sampled batch")
    fresh_trajectories: int = _f(
        0,
        "trajectories each process samples fresh every replay_ratio updates, in batches of "
        "batch_size (0: batch_size, one micro-batch's worth; the SQDF reference code samples "
        "batch_size x grad_accum)",
    )
    buffer_scope: str = _f(
        "process",
        "process: each process replays its own trajectories; shared: every process stores "
        "every process's fresh trajectories and replays from their union (the SQDF reference "
        "code's buffer), buffer_size in all",
    )
    rollout: str = _f(
        "full",
        "full: whole trajectories into the replay buffer; truncated: each fresh trajectory "
        "runs only to the step(s) the update uses (sqdf, buffer on_policy, replay_ratio 1)",
    )
    cells_per_trajectory: int = _f(
        1, "truncated rollouts: steps used per trajectory (cells = batch_size x this)"
    )
    ema_decay: float = _f(
        0.0,
        "exponential moving average of the trainable weights, e.g. 0.999 (0: off); kept in "
        "checkpoints, saved as RUN/final/ema/ and used by sqdf eval and sample",
    )
    seed: int = _f(0, "random seed (initialisation, sampling, replay)")
    device: str = _f("auto", "torch device: auto, cpu, cuda, cuda:1, ...")
    log_every: int = _f(10, "write a metrics.jsonl line every N updates")
    log_with: str = _f(
        "",
        "experiment trackers that get every metrics.jsonl line too, comma-separated: "
        "tensorboard, wandb, mlflow, trackio (none by default)",
    )
    checkpoint_every: int = _f(100, "save a resumable checkpoint every N updates (0: never)")
    sample_every: int = _f(
        0,
        "every N updates, a picture of policy and reference samples from the same fixed seeds "
        "and conditions into RUN/samples/ and the trackers (0: never)",
    )
    eval_every: int = _f(
        0,
        "every N updates, a small evaluation of the policy against the reference into "
        "RUN/eval_metrics.jsonl and the trackers: sd on its eval_prompts (2 images each), "
        "gmm2d and digits on 128 samples, from fixed seeds (0: never)",
    )
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep")
    max_skips: int = _f(
        20, "stop after this many consecutive updates skipped for non-finite values"
    )

    def __post_init__(self) -> None:
        self._coerce_types()
        self._check()

    def _coerce_types(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            ok = {
                "float": isinstance(value, float),
                "int": isinstance(value, int) and not isinstance(value, bool),
                "str": isinstance(value, str),
                "dict": isinstance(value, dict),
            }[kind]
            if not ok:
                raise ConfigError(f"{f.name} must be a {kind}, got {value!r}")
            checked = value  # a parameter table's too: reward_params.scale = inf
            if f.name == "reward_params":  # but a user's reward's own are its business
                users = users_params(self.reward, value)
                checked = {k: v for k, v in value.items() if k not in users}
            check_finite(checked, f.name)
            setattr(self, f.name, value)

    def _check(self) -> None:
        """Each field's type and range. Whether the task and method exist (and what a method
        requires) is for their registries to say: sqdf.run.settings.check_registered."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}")
        need(
            self.kl_scale in KL_SCALES,
            f"unknown kl_scale {self.kl_scale!r}; known: {', '.join(KL_SCALES)}",
        )
        # at alpha 0 gmm2d's exact optimum is a point mass (or none, for a linear reward)
        need(
            self.task != "gmm2d" or self.alpha > 0,
            f"task 'gmm2d' is measured against its exact optimum p_ref * exp(r / alpha), which "
            f"needs alpha > 0, got alpha {self.alpha}",
        )
        need(0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}")
        need(
            self.estimator in ESTIMATORS,
            f"unknown estimator {self.estimator!r}; known: {', '.join(ESTIMATORS)}",
        )
        need(
            self.estimator != "exact" or self.task == "gmm2d",
            f"estimator 'exact' needs the closed-form posterior of task gmm2d; task "
            f"{self.task!r} has tweedie and consistency",
        )
        need(self.q_draws >= 1, f"q_draws must be >= 1, got {self.q_draws}")
        need(self.q_probes >= 1, f"q_probes must be >= 1, got {self.q_probes}")
        need(
            self.q_cov in Q_COVARIANCES,
            f"unknown q_cov {self.q_cov!r}; known: {', '.join(Q_COVARIANCES)}",
        )
        # 999 at most: with steps_offset=1 the first of 1000 steps would be timestep 1000
        need(1 <= self.num_steps <= 999, f"num_steps must be in [1, 999], got {self.num_steps}")
        need(0 < self.eta <= 1, f"eta must be in (0, 1], got {self.eta}")
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        # every process's stream is derived from it as a non-negative 64-bit integer
        need(0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(
            self.lr_schedule in LR_SCHEDULES,
            f"unknown lr_schedule {self.lr_schedule!r}; known: {', '.join(LR_SCHEDULES)}",
        )
        need(
            0 <= self.lr_warmup < self.steps,
            f"lr_warmup must be in [0, steps), got {self.lr_warmup} (steps {self.steps})",
        )
        need(
            0 <= self.lr_min < self.lr,
            f"lr_min must be in [0, lr) = [0, {self.lr:g}), got {self.lr_min}",
        )
        need(
            self.lr_min == 0 or self.lr_schedule != "constant",
            f"lr_min is the end of a cosine or linear lr_schedule; constant has none, got "
            f"lr_min {self.lr_min}",
        )
        need(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        need(
            self.buffer in BUFFER_STRATEGIES,
            f"unknown buffer strategy {self.buffer!r}; known: {', '.join(BUFFER_STRATEGIES)}",
        )
        need(
            self.buffer_size >= self.batch_size,
            f"buffer_size must be >= batch_size ({self.batch_size}), got {self.buffer_size}",
        )
        need(
            self.buffer_store in BUFFER_STORES,
            f"unknown buffer_store {self.buffer_store!r}; known: {', '.join(BUFFER_STORES)}",
        )
        need(
            self.buffer_dtype in BUFFER_DTYPES,
            f"unknown buffer_dtype {self.buffer_dtype!r}; known: {', '.join(BUFFER_DTYPES)}",
        )
        need(self.replay_ratio >= 1, f"replay_ratio must be >= 1, got {self.replay_ratio}")
        need(
            0 <= self.fresh_trajectories <= self.buffer_size,
            f"fresh_trajectories must be in [0, buffer_size] = [0, {self.buffer_size}], got "
            f"{self.fresh_trajectories}",
        )
        need(
            self.buffer_scope in BUFFER_SCOPES,
            f"unknown buffer_scope {self.buffer_scope!r}; known: {', '.join(BUFFER_SCOPES)}",
        )
        need(
            self.rollout in ROLLOUTS,
            f"unknown rollout {self.rollout!r}; known: {', '.join(ROLLOUTS)}",
        )
        if self.rollout == "truncated":
            # a truncated trajectory has no final sample to replay or to rank by its reward
            need(
                self.method == "sqdf" and self.buffer == "on_policy" and self.replay_ratio == 1,
                "rollout 'truncated' needs method sqdf, buffer on_policy and replay_ratio 1, "
                f"got {self.method}, {self.buffer}, {self.replay_ratio}",
            )
            need(
                self.fresh_trajectories == 0 and self.buffer_scope == "process",
                "rollout 'truncated' samples each micro-batch fresh and keeps no buffer: "
                "fresh_trajectories and buffer_scope do not apply",
            )
        need(
            1 <= self.cells_per_trajectory <= self.num_steps,
            f"cells_per_trajectory must be in [1, num_steps], got {self.cells_per_trajectory}",
        )
        need(
            self.cells_per_trajectory == 1 or self.rollout == "truncated",
            "cells_per_trajectory > 1 needs rollout 'truncated'",
        )
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        parse_log_with(self.log_with)
        need(
            self.checkpoint_every >= 0,
            f"checkpoint_every must be >= 0, got {self.checkpoint_every}",
        )
        need(self.sample_every >= 0, f"sample_every must be >= 0, got {self.sample_every}")
        need(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        need(
            self.keep_checkpoints >= 1,
            f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}",
        )
        need(self.max_skips >= 1, f"max_skips must be >= 1, got {self.max_skips}")

    @property
    def fresh_count(self) -> int:
        """Trajectories each process samples fresh every ``replay_ratio`` updates."""
        return self.fresh_trajectories or self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
