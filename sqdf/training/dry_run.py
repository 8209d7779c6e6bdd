"""``sqdf train --dry-run``: what a run would do, resolved and sized, without training. Reads
the model folder's configs only (the shape of a sample), never its weights."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
from typing import TYPE_CHECKING, Any

import torch

from sqdf.config.train_config import TrainConfig, config_fields
from sqdf.core.kl import KL_SCALES, alpha_in_sum_convention
from sqdf.errors import ConfigError, SqdfError
from sqdf.infra.weights import OfflineWeightError, plan_text, plan_unreached, planning, resolve
from sqdf.methods import METHODS, build_method_params
from sqdf.rewards import build_reward
from sqdf.rewards.custom import check_findable
from sqdf.rewards.mixture import parse_mixture, reward_of
from sqdf.run.settings import DICT_KEYS, Resolved
from sqdf.tasks import on_flow_path, resolved_reward_name, sample_shape
from sqdf.training.start import alpha_note, check_method_takes_reward

if TYPE_CHECKING:
    from sqdf.cost.report import RewardSwap

STATE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # per stored value


def buffer_dtype(cfg: TrainConfig) -> str:
    """The dtype the replay buffer keeps its states in: buffer_dtype; auto: the sd task's
    dtype (its own auto: bfloat16 on a GPU, float32 on the CPU), float32 for other tasks."""
    if cfg.buffer_dtype != "auto":
        return cfg.buffer_dtype
    if cfg.task != "sd":
        return "float32"
    if METHODS[cfg.method].likelihood_ratio:
        return "float32"  # make_buffer: ratios of rounded states would be biased
    name = cfg.task_params.get("dtype", "auto")
    if name == "auto":  # planned, not resolved: a GPU run may be planned on a CPU machine
        on_gpu = cfg.device.startswith("cuda") or (
            cfg.device == "auto" and torch.cuda.is_available()
        )
        name = "bfloat16" if on_gpu else "float32"
    return name


def buffer_bytes(cfg: TrainConfig, dims: int) -> int:
    """Bytes of one process's full replay buffer (host memory, or RUN/buffer/ with
    buffer_store disk): every state of every trajectory."""
    if cfg.rollout == "truncated":
        return 0
    return cfg.buffer_size * (cfg.num_steps + 1) * dims * STATE_BYTES[buffer_dtype(cfg)]


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def plan(
    resolved: Resolved,
    processes: int = 1,
    model: str | None = None,
    *,
    check_reward: bool = True,
) -> dict[str, Any]:
    """The numbers a dry run shows: the model's D, alpha in both conventions, the effective
    batch and the replay buffer's host memory. ``model``: the sd model's folder, where it was
    resolved already (else the sizes resolve the run's own ``model``). ``check_reward``
    False: the run trains on another reward than the task's (sqdf bbo's rounds), so the
    task's reward need not have a gradient."""
    cfg = resolved.config()
    if check_reward:
        check_method_takes_reward(cfg)
    # the method's own settings, refused as the run refuses them (else the cost trace, which
    # builds them too, would only say it could not trace them)
    params = build_method_params(cfg.method, cfg.method_params)
    sized = cfg if model is None else _with_model(cfg, model)
    if getattr(params, "kl_scale", None) == "flow_grpo" and not on_flow_path(sized):
        raise ConfigError(
            f"method '{cfg.method}': KL scale 'flow_grpo' is Flow-GRPO's beta on the flow SDE's "
            f"step, and this {cfg.task} task samples with DDIM (use sum, mean or half_mean)"
        )
    shape = sample_shape(sized)
    dims = math.prod(shape)
    cells = cfg.batch_size * cfg.cells_per_trajectory
    alpha_sum = alpha_in_sum_convention(cfg.alpha, cfg.kl_scale, dims)
    return {
        "config": cfg,
        "shape": shape,
        "dims": dims,
        "alpha_sum": alpha_sum,
        "alpha_mean": alpha_sum * dims / KL_SCALES["mean"],
        "cells_per_micro_batch": cells,
        "processes": processes,
        "effective_batch": cells * processes * cfg.grad_accum,
        "fresh_per_process": cfg.fresh_count,
        "buffer_bytes": buffer_bytes(cfg, dims),
    }


def dry_run_text(
    resolved: Resolved,
    processes: int = 1,
    gpu_memory: int | None = None,
    cost: bool = True,
    *,
    title: str = "sqdf train --dry-run: nothing is trained; the run would use (value, from)",
    swap: RewardSwap | None = None,
    check_reward: bool = True,
) -> str:
    """The dry run's report: ``title``, every setting with the layer it came from, then the
    sizes, (``cost``) what one update costs with a fit verdict against ``gpu_memory`` bytes,
    then the weights the run would download (of Hub references: configs only are fetched
    here). ``swap``: what the run's update scores with instead of the task's reward (sqdf
    bbo's proxy), traced in its place. ``check_reward`` False: the update does not
    differentiate the task's reward (sqdf bbo's rounds: the proxy or the oracle's values)."""
    with planning() as downloads, contextlib.ExitStack() as stack:
        cfg = resolved.config()
        model, offline = None, None
        if cfg.task == "sd" and not cfg.task_params.get("model"):
            sample_shape(cfg)  # no model: the task's own one-line refusal, as the run gives
        if cfg.task == "sd":
            model, offline = _model_folder(cfg.task_params["model"], stack)
        p = plan(resolved, processes, model, check_reward=check_reward)
        reward = resolved_reward_name(cfg)
        unlisted = None
        if ":" in reward:  # a user's module:function (alone or in a mixture): looked up on
            # the path, so that a bad name fails the plan here
            for part in parse_mixture(reward) or [reward]:
                if ":" in reward_of(part):
                    check_findable(reward_of(part), "custom reward")
        else:
            try:
                build_reward(reward, cfg.reward_params)
            except OfflineWeightError as err:  # the run itself will say so; a plan goes on
                if err.given is not None:  # listed and counted with the plan's others
                    plan_unreached(err.given, err)
                else:
                    unlisted = str(err)
        text = _settings_text(resolved, p, processes, model, title)
        if offline:
            text += "\n" + offline
        if cost:  # traced from the configs of the resolved folders (configs only fetched here)
            traced = cfg if model is None else _with_model(cfg, model)
            traced, lcm_note = _offline_lcm(traced, downloads, stack)
            if lcm_note:
                text += "\n" + lcm_note
            text += "\n" + "\n".join(cost_section(traced, gpu_memory, swap))
    if downloads:
        text += "\nweights (Hub references; sizes from the Hub's file metadata or the cache):\n"
        text += "\n".join(plan_text(downloads))
    if unlisted:
        text += f"\nweights not listed: {unlisted}"
    return text


def _with_model(cfg: TrainConfig, model: str) -> TrainConfig:
    return dataclasses.replace(cfg, task_params={**cfg.task_params, "model": model})


def _model_folder(given: str, stack: contextlib.ExitStack) -> tuple[str, str | None]:
    """The sd model's folder for the plan: resolved (configs only), or, where the Hub cannot
    be reached and the cache lacks it, the configs sqdf ships for that repository written to
    a temporary folder (closed with ``stack``), with a line saying so."""
    from sqdf.cost.model_configs import read_shipped, shipped_for, write_config_folder

    try:
        return resolve(given, "task 'sd' model"), None
    except OfflineWeightError as err:
        name = shipped_for(given)
        if name is None:
            raise
        plan_unreached(given, err)  # its weights are not listed, and not counted
    folder = write_config_folder(name, stack.enter_context(tempfile.TemporaryDirectory()))
    repo = read_shipped(name)["repo"]
    note = (
        f"model: {given} is not in the Hub cache and the Hub cannot be reached; planned and "
        f"traced from the configs sqdf ships for {repo} (sqdf/assets/model_configs/{name}.json, "
        "which names their source), not from the revision itself"
    )
    return str(folder), note


def _offline_lcm(
    cfg: TrainConfig, planned: list[dict[str, Any]], stack: contextlib.ExitStack
) -> tuple[TrainConfig, str | None]:
    """``cfg`` with an sd consistency network the plan could not reach (``planned``: the
    plan's entries) replaced, for the trace, by the configs sqdf ships for its repository's
    component (FLUX.1 schnell's transformer), with a line saying so; unchanged otherwise (a
    network it has no configs for is then not sized, and the cost section says why)."""
    from sqdf.cost.model_configs import read_shipped, shipped_component_for, write_config_folder

    given = cfg.task_params.get("lcm") if cfg.task == "sd" else None
    unreached = any(e["given"] == given and e.get("unreached") for e in planned)
    found = shipped_component_for(str(given)) if given and unreached else None
    if found is None:
        return cfg, None
    name, sub = found
    folder = write_config_folder(name, stack.enter_context(tempfile.TemporaryDirectory()))
    note = (
        f"lcm: {given} is not in the Hub cache and the Hub cannot be reached; traced from the "
        f"configs sqdf ships for {read_shipped(name)['repo']} "
        f"(sqdf/assets/model_configs/{name}.json, its {sub}/)"
    )
    params = {**cfg.task_params, "lcm": str(folder / sub)}
    return dataclasses.replace(cfg, task_params=params), note


def _settings_text(
    resolved: Resolved, p: dict[str, Any], processes: int, model: str | None, title: str
) -> str:
    cfg: TrainConfig = p["config"]
    lines = [title]
    if resolved.preset is not None:
        lines.append(f"preset {resolved.preset.name}: {resolved.preset.description}")
    for f in config_fields():
        value = getattr(cfg, f.name)
        if f.name in DICT_KEYS:
            for sub, v in value.items():
                key = f"{f.name}.{sub}"
                lines.append(f"  {key:<28} {v!r:<28} {resolved.source_of(key)}")
            continue
        shown = value
        if f.name == "reward" and value == "auto":
            shown = f"auto ({resolved_reward_name(cfg)})"
        lines.append(f"  {f.name:<28} {str(shown):<28} {resolved.source_of(f.name)}")
    shape = " x ".join(str(s) for s in p["shape"])
    if model is not None:
        from sqdf.tasks.sd_family import family_of

        family = family_of(model)
        lines.append(f"model: {family.label} ({family.pipeline}) in {cfg.task_params['model']}")
    lines.append(f"sample: D = {p['dims']:,} dimensions ({shape})")
    if cfg.kl_scale == "sum":
        lines.append(
            f"alpha: {cfg.alpha:g} weights the exact KL summed over D (kl_scale sum); "
            f"{p['alpha_mean']:.4g} as the SQDF reference code writes it (kl_scale mean)"
        )
    else:  # the line a run logs at its start
        kl = {"kl_scale": cfg.kl_scale, "alpha": cfg.alpha, "dims": p["dims"],
              "alpha_sum": p["alpha_sum"]}  # fmt: skip
        lines.append(f"{alpha_note(kl)} (what the losses use)")
    lines.append(
        f"effective batch: {p['effective_batch']} cells per update = "
        f"{p['cells_per_micro_batch']} per micro-batch x {processes} process(es) x "
        f"{cfg.grad_accum} accumulation step(s)"
    )
    if cfg.rollout == "truncated":
        lines.append("replay buffer: none (truncated rollouts)")
    else:
        lines.append(
            f"fresh trajectories: {cfg.fresh_count} per process every {cfg.replay_ratio} "
            f"update(s) (fresh_trajectories {cfg.fresh_trajectories or 'batch_size'}), "
            f"{cfg.fresh_count * processes} in all; {cfg.steps} updates"
        )
        if cfg.buffer_scope == "shared":
            lines.append(
                "buffer_scope shared: every process stores every process's fresh "
                "trajectories and replays from their union"
            )
        dtype = buffer_dtype(cfg)
        where = (
            "of host memory per process when full"
            if cfg.buffer_store == "memory"
            else "on disk in RUN/buffer/ per process when full (up to twice that while a "
            "checkpoint keeps its rows), not in host memory"
        )
        lines.append(
            f"replay buffer: {cfg.buffer_size:,} trajectories x {cfg.num_steps + 1} states x "
            f"{p['dims']:,} values x {STATE_BYTES[dtype]} bytes ({dtype}) = "
            f"{_gib(p['buffer_bytes'])} {where}"
        )
    if resolved.preset is not None and resolved.preset.notes:
        lines.append(f"note: {resolved.preset.notes}")
    return "\n".join(lines)


def cost_section(
    cfg: TrainConfig, gpu_memory: int | None, swap: RewardSwap | None = None
) -> list[str]:
    """FLOPs per update and traced GPU memory (sqdf.cost): traced on meta tensors from the
    model folder's configs."""
    from sqdf.cost.report import cost_lines

    try:
        return cost_lines(cfg, gpu_memory, swap)
    except (OSError, KeyError, TypeError, ValueError, SqdfError) as err:
        # a folder with the configs the sizes need but not every field a network needs
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return [f"cost of one update: not traced ({reason})"]
