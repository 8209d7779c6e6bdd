"""sqdf: Soft Q-based Diffusion Fine-tuning (arXiv 2512.04559).

from sqdf import TrainConfig, train, evaluate_run
run = train(TrainConfig(task="gmm2d", steps=200), "runs/demo")
print(evaluate_run(run)["target_mode_tv"])
"""

from sqdf.config.train_config import TrainConfig  # noqa: E402
from sqdf.errors import ConfigError, SqdfError  # noqa: E402
from sqdf.evaluation.evaluate import evaluate_run, load_run, sample_run  # noqa: E402
from sqdf.run.folder import read_metrics  # noqa: E402
from sqdf.run.settings import config_for  # noqa: E402
from sqdf.training.trainer import train  # noqa: E402
from sqdf.version import __version__  # noqa: E402, F401

__all__ = [
    "ConfigError",
    "SqdfError",
    "TrainConfig",
    "config_for",
    "evaluate_run",
    "load_run",
    "read_metrics",
    "sample_run",
    "train",
]
