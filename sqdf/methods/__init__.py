"""Methods by name. A method is a loss over the cells the trainer draws from the replay buffer:
``loss(task, cells, cfg, params, generator) -> (scalar loss, stats)``, where ``params`` is the
method's own settings dataclass (from ``method_params``). Methods that sample their own chains
(DRaFT, AlignProp, ReFL) use only the cells' conditions. ``stats["reward_evals"]`` counts the
reward evaluations the loss made, so budgets can be compared. A method that learns from groups
(GRPO, ``grouped``) gets each cell's group in the newest batch too
(``sqdf.training.grouped_cells.gather_newest``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqdf.errors import ConfigError
from sqdf.methods.alignprop import AlignPropParams, alignprop_loss
from sqdf.methods.ddpo import DdpoParams, ddpo_loss
from sqdf.methods.draft import DraftParams, draft_kl_loss, draft_loss, draft_lv_loss
from sqdf.methods.grpo import GrpoParams, grpo_loss
from sqdf.methods.refl import ReflParams, refl_loss
from sqdf.methods.sqdf import SqdfParams, sqdf_loss


@dataclass(frozen=True)
class Method:
    loss: Callable
    params: type
    buffer: str | None = None  # a replay strategy the method requires, if any
    # None, or why the number of policy passes differs between processes (each draws its own
    # truncation), which FSDP cannot run: every process must all-gather the same times
    uneven_passes: str | None = None
    # the statistics its loss reports (besides reward_evals), averaged into the metrics; fixed
    # so that processes average the same vector even when one of them skipped the loss
    stats: tuple[str, ...] = ("kl_mean", "q_mean")
    # whether a fresh batch is groups of params.group_size samples of one condition each (the
    # trainer draws batch_size / G conditions, each G times in a row) and the loss is told
    # each cell's group
    grouped: bool = False
    # whether the loss reads the sampler's log-likelihood of each stored step (cells.logp):
    # a likelihood ratio needs the states stored as they were sampled, in float32
    likelihood_ratio: bool = False
    # whether the loss back-propagates the reward's gradient into the samples (every method
    # but the policy-gradient ones, which only read rewards)
    reward_gradient: bool = True


METHODS: dict[str, Method] = {
    "sqdf": Method(sqdf_loss, SqdfParams),
    "draft": Method(draft_loss, DraftParams),
    "draft_lv": Method(draft_lv_loss, DraftParams),
    "draft_kl": Method(draft_kl_loss, DraftParams),
    "refl": Method(refl_loss, ReflParams, uneven_passes="each process draws its gradient step"),
    "alignprop": Method(
        alignprop_loss, AlignPropParams, uneven_passes="each process draws its truncation"
    ),
    "ddpo": Method(
        ddpo_loss,
        DdpoParams,
        buffer="on_policy",
        stats=("kl_mean", "q_mean", "clip_frac"),
        likelihood_ratio=True,
        reward_gradient=False,
    ),
    "grpo": Method(
        grpo_loss,
        GrpoParams,
        buffer="on_policy",
        stats=("kl_mean", "q_mean", "clip_frac"),
        grouped=True,
        likelihood_ratio=True,
        reward_gradient=False,
    ),
}


def check_reward_gradient(method: str, reward: str, differentiable: bool) -> None:
    """A method that back-propagates the reward refuses a reward without a gradient, in one
    line saying what takes it instead."""
    if METHODS[method].reward_gradient and not differentiable:
        takers = ", ".join(n for n, m in METHODS.items() if not m.reward_gradient)
        raise ConfigError(
            f"method {method!r} back-propagates the reward's gradient, and reward {reward!r} "
            f"is not differentiable; train on it with a policy-gradient method ({takers}), "
            "compare best_of_n, or sqdf bbo (which fine-tunes on a differentiable proxy of it)"
        )


def group_size(name: str, params: Any) -> int:
    """How many samples of one condition method ``name`` draws in a row: its params'
    group_size if it learns from groups, else 1."""
    return params.group_size if METHODS[name].grouped else 1


def build_method_params(name: str, params: Mapping[str, Any]) -> Any:
    from sqdf.config.params import build_settings

    return build_settings(METHODS[name].params, dict(params), f"method {name!r}")
