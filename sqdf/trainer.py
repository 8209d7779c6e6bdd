"""The one training loop every method shares.

Per update: (every ``replay_ratio`` updates) sample a fresh batch of trajectories without
gradients and store it in the replay buffer; draw ``grad_accum`` micro-batches of
(trajectory, step) cells; accumulate the method's loss; clip; AdamW step; log; checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sqdf.buffer import ReplayBuffer
from sqdf.checkpoint import (
    Checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from sqdf.config import TrainConfig
from sqdf.methods import METHODS
from sqdf.rewards import reward_params
from sqdf.run import append_metrics, prepare_run, truncate_metrics, write_config
from sqdf.sampler import sample_trajectories
from sqdf.tasks import build_task, resolved_reward_name


def train(
    cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True
) -> Path:
    """Fine-tune ``cfg.task``'s model with ``cfg.method``; returns the run folder.

    With ``resume=True``, ``out`` must be an earlier run of the same config: training goes
    on from its latest checkpoint and gives the same result as an uninterrupted run.
    """
    run = Path(out)
    saved = prepare_run(run, cfg, resume)
    torch.manual_seed(cfg.seed)  # the policy's initialisation
    task = build_task(cfg)
    write_config(
        run,
        cfg,
        {
            "task_params": dataclasses.asdict(task.options) if hasattr(task, "options") else {},
            "reward": resolved_reward_name(cfg),
            "reward_params": reward_params(task.reward_model),
            "device": str(task.device),
        },
    )
    loss_fn = METHODS[cfg.method]
    params = [p for p in task.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    buffer = ReplayBuffer(cfg.buffer_size, cfg.buffer, cfg.num_steps, cfg.gamma)
    generator = torch.Generator().manual_seed(cfg.seed)
    start, samples_seen, wall_before = 0, 0, 0.0

    ckpts = list_checkpoints(run / "checkpoints")
    if resume and ckpts:
        ck = load_checkpoint(ckpts[-1])
        task.policy.load_state_dict(ck.policy)
        optimizer.load_state_dict(ck.optimizer)
        buffer.load_state_dict(ck.buffer)
        generator.set_state(ck.rng)
        start, samples_seen, wall_before = ck.step, ck.state["samples_seen"], ck.state["wall_s"]
    truncate_metrics(run, start, saved.log_every if saved is not None else cfg.log_every)

    def checkpoint(step: int, wall: float) -> None:
        save_checkpoint(
            run / "checkpoints",
            Checkpoint(
                step=step,
                policy=task.policy.state_dict(),
                optimizer=optimizer.state_dict(),
                buffer=buffer.state_dict(),
                rng=generator.get_state(),
                state={"samples_seen": samples_seen, "wall_s": wall},
            ),
            keep=cfg.keep_checkpoints,
        )

    t0 = time.perf_counter() - wall_before
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        disable=not progress,
        desc=f"{cfg.method} on {cfg.task}",
        dynamic_ncols=True,
    )
    step = start
    try:
        for step in bar:
            if step % cfg.replay_ratio == 0:
                traj = sample_trajectories(task, cfg.batch_size, generator)
                with torch.no_grad():
                    rewards = task.reward(traj.x0.to(task.device), traj.cond.to(task.device))
                buffer.add(traj, rewards)
                samples_seen += cfg.batch_size
            fresh = buffer.rewards[buffer.newest]

            optimizer.zero_grad(set_to_none=True)
            loss_total, stats_total = 0.0, {}
            for _ in range(cfg.grad_accum):
                cells = buffer.sample_cells(cfg.batch_size, generator)
                loss, stats = loss_fn(task, cells, cfg, generator)
                (loss / cfg.grad_accum).backward()
                loss_total += loss.item() / cfg.grad_accum
                for k, v in stats.items():
                    stats_total[k] = stats_total.get(k, 0.0) + v / cfg.grad_accum
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            optimizer.step()

            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                row = {
                    "step": done,
                    "loss": loss_total,
                    "reward_mean": float(fresh.mean()),
                    "reward_std": float(fresh.std()) if fresh.numel() > 1 else 0.0,
                    "kl_mean": float("nan"),  # every row has it; a method without a KL leaves NaN
                    **stats_total,
                    "grad_norm": grad_norm,
                    "lr": optimizer.param_groups[0]["lr"],
                    "samples_seen": samples_seen,
                    "wall_s": round(time.perf_counter() - t0, 3),
                }
                append_metrics(run, row)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl_mean']:.3f}")
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                checkpoint(done, time.perf_counter() - t0)
    finally:
        bar.close()

    (run / "final").mkdir(exist_ok=True)
    save_weights(task.policy.state_dict(), run / "final" / "policy.safetensors")
    return run
