"""Sampling fresh trajectories: every ``replay_ratio`` updates a batch sampled without
gradients, scored, and stored in the replay buffer (whole groups only, for a grouped method;
the processes' union, for a shared buffer)."""

from __future__ import annotations

import time

import torch

from sqdf.infra.distributed import Processes, all_gather_rows
from sqdf.methods import group_size
from sqdf.sampling.sampler import Trajectories, sample_trajectories
from sqdf.training.state import Fresh, TrainingRun


def sample_fresh(s: TrainingRun, step: int) -> Fresh:
    """Every ``replay_ratio`` updates (full rollouts only): a fresh batch of trajectories,
    scored and stored (those with a finite reward; for a grouped method, the groups finite
    throughout). Returns the newest batch's rewards too."""
    cfg, fresh = s.cfg, Fresh()
    s.phase = "sampling"
    if step % cfg.replay_ratio == 0 and cfg.rollout == "full":
        began = time.perf_counter()
        if step == s.start and s.caller is not None and s.caller.fresh is not None:
            (traj, rewards), parts = s.caller.fresh, {}
        else:
            traj, rewards, parts = sample_scored(s)
        finite = torch.isfinite(rewards).cpu()  # waits for the GPU
        s.counters["sample_s"] += time.perf_counter() - began
        fresh.bad, fresh.sampled = int((~finite).sum()), finite.shape[0]
        if fresh.bad:
            fresh.cause = (
                f"the reward was not finite for {fresh.bad} of {fresh.sampled} fresh samples"
            )
        keep = whole_groups(finite, group_size(cfg.method, s.method_params))
        kept, kept_rewards = traj.select(keep), rewards.cpu()[keep]
        kept_parts = {n: p.cpu()[keep].double() for n, p in parts.items()}
        if cfg.buffer_scope == "shared":  # every process stores the union, in rank order
            kept, kept_rewards, kept_parts = share_fresh(s.procs, kept, kept_rewards, kept_parts)
        if kept_rewards.numel():
            s.buffer.add(kept, kept_rewards)
            s.cell_schedule.new_batch()
            s.reward_parts = kept_parts
    fresh.rewards = s.buffer.rewards[s.buffer.newest].double()
    fresh.parts = s.reward_parts
    return fresh


def sample_scored(s: TrainingRun) -> tuple[Trajectories, torch.Tensor, dict[str, torch.Tensor]]:
    """``fresh_count`` fresh trajectories of this process, sampled and scored in batches of
    at most ``batch_size`` (what one sampling pass holds in memory), with their rewards and a
    mixture's components."""
    cfg, task = s.cfg, s.task
    trajs, rewards, parts = [], [], []
    left = cfg.fresh_count
    while left > 0:
        n = min(cfg.batch_size, left)
        cond = fresh_conditions(s, n)  # None: the sampler draws them
        traj = sample_trajectories(task, n, s.generator, cond=cond)
        with torch.no_grad():
            r, p = task.reward_with_parts(traj.x0.to(task.device), traj.cond.to(task.device))
        trajs.append(traj)
        rewards.append(r)
        parts.append(p)
        left -= n
    if len(trajs) == 1:
        return trajs[0], rewards[0], parts[0]
    joined = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    return concat_trajectories(trajs), torch.cat(rewards), joined


def concat_trajectories(trajs: list[Trajectories]) -> Trajectories:
    """Batches of trajectories as one, in order."""

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(t, name) for t in trajs]
        return None if values[0] is None else torch.cat(values)

    return Trajectories(cat("states"), cat("cond"), cat("kl"), cat("logp"))


def share_fresh(
    procs: Processes,
    traj: Trajectories,
    rewards: torch.Tensor,
    parts: dict[str, torch.Tensor],
) -> tuple[Trajectories, torch.Tensor, dict[str, torch.Tensor]]:
    """Every process's kept fresh trajectories, rewards and reward components, joined in rank
    order: what each process stores with buffer_scope shared, so that every buffer holds the
    same union and each process replays from all of it (collective)."""
    if procs.world == 1:
        return traj, rewards, parts
    fields = {"states": traj.states, "cond": traj.cond, "rewards": rewards}
    for name in ("kl", "logp"):
        if getattr(traj, name) is not None:
            fields[name] = getattr(traj, name)
    fields.update({f"part.{k}": v for k, v in parts.items()})
    joined = all_gather_rows(procs, fields)
    union = Trajectories(joined["states"], joined["cond"], joined.get("kl"), joined.get("logp"))
    shared_parts = {k.removeprefix("part."): v for k, v in joined.items() if k.startswith("part.")}
    return union, joined["rewards"], shared_parts


def fresh_conditions(s: TrainingRun, n: int) -> torch.Tensor | None:
    """A fresh batch's conditions for a method that learns from groups of G (GRPO):
    n / G of the task's draws, each repeated G times in a row. None for the others:
    the sampler draws them, one per sample."""
    size = group_size(s.cfg.method, s.method_params)
    if size == 1:
        return None
    return s.task.sample_conditions(n // size, s.generator).repeat_interleave(size)


def whole_groups(finite: torch.Tensor, size: int) -> torch.Tensor:
    """The positions of a fresh batch to store: those with a finite reward; in groups of
    ``size`` consecutive samples, only the groups finite throughout, so that every stored
    group is normalised over all its members and the newest batch stays whole groups."""
    return finite.view(-1, size).all(dim=1).repeat_interleave(size).nonzero().squeeze(1)
