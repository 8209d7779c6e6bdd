"""The one training loop every method shares.

Per update: (every ``replay_ratio`` updates) sample a fresh batch of trajectories without
gradients and store it in the replay buffer; draw ``grad_accum`` micro-batches of
(trajectory, step) cells; accumulate the method's loss; clip; AdamW step; log; checkpoint.

Non-finite values never reach the weights: fresh samples with a non-finite reward are not
stored, and an update whose loss or gradient is not finite is skipped (and counted). After
``max_skips`` consecutive skips the run stops with a message naming the cause.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sqdf.buffer import ReplayBuffer
from sqdf.checkpoint import Checkpoint, load_latest_checkpoint, save_checkpoint, save_weights
from sqdf.config import TrainConfig
from sqdf.errors import SqdfError
from sqdf.methods import METHODS, build_method_params
from sqdf.rewards import reward_params
from sqdf.run import append_metrics, prepare_run, truncate_metrics, write_config
from sqdf.sampler import sample_trajectories
from sqdf.tasks import build_task, resolved_reward_name


def train(
    cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True
) -> Path:
    """Fine-tune ``cfg.task``'s model with ``cfg.method``; returns the run folder.

    With ``resume=True``, ``out`` must be an earlier run of the same config: training goes
    on from its latest valid checkpoint and gives the same result as an uninterrupted run.
    """
    run = Path(out)
    saved = prepare_run(run, cfg, resume)
    method_params = build_method_params(cfg.method, cfg.method_params)
    torch.manual_seed(cfg.seed)  # the policy's initialisation
    task = build_task(cfg)
    write_config(
        run,
        cfg,
        {
            "task_params": dataclasses.asdict(task.options) if hasattr(task, "options") else {},
            "reward": resolved_reward_name(cfg),
            "reward_params": reward_params(task.reward_model),
            "method_params": dataclasses.asdict(method_params),
            "device": str(task.device),
        },
    )
    loss_fn = METHODS[cfg.method].loss
    params = [p for p in task.policy.parameters() if p.requires_grad]
    # constant learning rate: there is no LR schedule whose state would need saving
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    buffer = ReplayBuffer(cfg.buffer_size, cfg.buffer, cfg.num_steps, cfg.gamma)
    generator = torch.Generator().manual_seed(cfg.seed)
    counters = {
        "samples_seen": 0, "reward_evals": 0, "skipped_updates": 0, "nonfinite_rewards": 0,
        "wall_s": 0.0,
    }  # fmt: skip
    start = 0

    ck = load_latest_checkpoint(run / "checkpoints") if resume else None
    if ck is not None:
        task.policy.load_state_dict(ck.policy)
        optimizer.load_state_dict(ck.optimizer)
        buffer.load_state_dict(ck.buffer)
        generator.set_state(ck.rng)
        start = ck.step
        counters.update({k: ck.state[k] for k in counters if k in ck.state})
    truncate_metrics(run, start, saved.log_every if saved is not None else cfg.log_every)

    def checkpoint(step: int) -> None:
        save_checkpoint(
            run / "checkpoints",
            Checkpoint(
                step=step,
                policy=task.policy.state_dict(),
                optimizer=optimizer.state_dict(),
                buffer=buffer.state_dict(),
                rng=generator.get_state(),
                state={**counters, "wall_s": time.perf_counter() - t0},
            ),
            keep=cfg.keep_checkpoints,
        )

    t0 = time.perf_counter() - counters["wall_s"]
    consecutive_skips = 0
    bar = tqdm(
        range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
        desc=f"{cfg.method} on {cfg.task}", dynamic_ncols=True,
    )  # fmt: skip
    try:
        for step in bar:
            cause = ""
            if step % cfg.replay_ratio == 0:
                traj = sample_trajectories(task, cfg.batch_size, generator)
                with torch.no_grad():
                    rewards = task.reward(traj.x0.to(task.device), traj.cond.to(task.device))
                finite = torch.isfinite(rewards).cpu()
                bad = int((~finite).sum())
                counters["nonfinite_rewards"] += bad
                counters["samples_seen"] += cfg.batch_size
                counters["reward_evals"] += cfg.batch_size
                if bad:
                    cause = f"the reward was not finite for {bad} of {cfg.batch_size} fresh samples"
                if bad < cfg.batch_size:
                    keep = finite.nonzero().squeeze(1)
                    buffer.add(traj.select(keep), rewards.cpu()[keep])
            fresh = buffer.rewards[buffer.newest]

            optimizer.zero_grad(set_to_none=True)
            loss_total, stats_total, skip = 0.0, {}, buffer.size == 0
            if skip:
                cause = (cause + "; " if cause else "") + "no sample has a finite reward yet"
            for _ in range(cfg.grad_accum if not skip else 0):
                cells = buffer.sample_cells(cfg.batch_size, generator)
                loss, stats = loss_fn(task, cells, cfg, method_params, generator)
                if not torch.isfinite(loss):
                    skip, cause = True, f"the loss was {loss.item()}"
                    break
                (loss / cfg.grad_accum).backward()
                loss_total += loss.item() / cfg.grad_accum
                counters["reward_evals"] += int(stats.pop("reward_evals", 0))
                for k, v in stats.items():
                    stats_total[k] = stats_total.get(k, 0.0) + v / cfg.grad_accum
            grad_norm = math.nan
            if not skip:
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
                if not math.isfinite(grad_norm):
                    skip, cause = True, f"the gradient norm was {grad_norm}"
            if skip:
                optimizer.zero_grad(set_to_none=True)
                counters["skipped_updates"] += 1
                consecutive_skips += 1
                if consecutive_skips >= cfg.max_skips:
                    raise SqdfError(
                        f"stopped after {consecutive_skips} consecutive updates skipped for "
                        f"non-finite values: {cause} (the weights were not changed by them)"
                    )
            else:
                optimizer.step()
                consecutive_skips = 0

            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                row = {
                    "step": done,
                    "loss": loss_total if not skip else math.nan,
                    "reward_mean": float(fresh.mean()) if fresh.numel() else math.nan,
                    "reward_std": float(fresh.std()) if fresh.numel() > 1 else 0.0,
                    "kl_mean": math.nan,  # every row has it; a method without a KL leaves NaN
                    **stats_total,
                    "grad_norm": grad_norm,
                    "lr": optimizer.param_groups[0]["lr"],
                    "samples_seen": counters["samples_seen"],
                    "reward_evals": counters["reward_evals"],
                    "skipped_updates": counters["skipped_updates"],
                    "nonfinite_rewards": counters["nonfinite_rewards"],
                    "wall_s": round(time.perf_counter() - t0, 3),
                }
                append_metrics(run, row)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl_mean']:.3f}")
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                checkpoint(done)
    finally:
        bar.close()

    (run / "final").mkdir(exist_ok=True)
    save_weights(task.policy.state_dict(), run / "final" / "policy.safetensors")
    return run
