"""One method, one seed of online black-box optimisation, round by round.

Round k: draw ``bbo.queries(k)`` samples from the current model (the same conditions
every round); send them to the oracle, persisting the answers as they arrive; record the
round's metrics; then, unless it is the last round (no query would be left to measure the
result), fit the proxy on every valid query so far and fine-tune against it with the shared
trainer, carrying the policy, optimizer and replay buffer to the next round; checkpoint.

Under ``accelerate launch`` or ``torchrun`` the main process alone draws the round's samples,
queries the oracle (the budget is spent once, not once per process), writes the query data and
the metrics; the others read each round from disk. Every process fits the same proxy on the
same data and fine-tunes on its share of the queried batch and its own replay buffer, with the
gradients averaged (the trainer's data parallelism). FSDP is not supported here.

Methods (each at the same query budget):
- ``sqdf``: SQDF against the optimistic proxy, KL-regularised to the pretrained model;
- ``seiko``: SEIKO-style, KL-regularised direct reward back-propagation through the whole
  chain (``draft_kl`` with K = num_steps unless ``method_params.k`` says otherwise);
- ``draft``, ``alignprop``: reward back-propagation against the proxy, no KL;
- ``ddpo``: DDPO on the oracle's values of the round's samples (no proxy);
- ``best_of_n``: no training; after k+1 rounds, each of the Q slots keeps the best of its
  k+1 reference samples, so the curve is best-of-(k+1) sampling at (k+1) x Q queries.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sqdf.bbo.config import BboConfig
from sqdf.bbo.data import (
    EXCLUDED,
    OK,
    PENDING,
    RoundData,
    load_round,
    load_rounds,
    queries_spent,
    round_path,
    save_round,
)
from sqdf.bbo.oracle import Oracle, OracleError, task_oracle, user_oracle
from sqdf.bbo.proxy import ProxyEnsemble, ProxyReward, feature_map
from sqdf.config.train_config import TrainConfig
from sqdf.errors import ConfigError, DivergedError, SqdfError
from sqdf.infra.atomic import atomic_write_text, folder_writes
from sqdf.infra.checkpoint import (
    Checkpoint,
    load_latest_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)
from sqdf.infra.distributed import Processes, rank_seed
from sqdf.infra.preemption import Preempted, received, stop_here_if_signalled, stop_on_signals
from sqdf.infra.trackers import check_installed, parse_log_with
from sqdf.methods import METHODS
from sqdf.run.settings import make_config
from sqdf.sampling.sampler import sample_trajectories
from sqdf.tasks import Task, build_task, resolved_reward_name
from sqdf.training.saving import gather_process_states, scaler_state
from sqdf.training.start import (
    loss_scaler,
    make_buffer,
    make_optimizer,
    restore_process_states,
    use_fused,
)
from sqdf.training.state import TrainState
from sqdf.training.trainer import train


@dataclass(frozen=True)
class BboMethod:
    train_method: str | None  # the trainer's method, None: no training
    proxy: bool  # fine-tunes against the proxy (else on the oracle's values)
    whole_chain: bool = False  # back-propagate through every sampling step (method_params k)


BBO_METHODS = {
    "sqdf": BboMethod("sqdf", True),
    # SEIKO back-propagates the KL-regularised reward through the whole chain
    "seiko": BboMethod("draft_kl", True, whole_chain=True),
    "draft": BboMethod("draft", True),
    "alignprop": BboMethod("alignprop", True),
    "ddpo": BboMethod("ddpo", False),
    "best_of_n": BboMethod(None, False),
}


def round_seed(seed: int, k: int, stream: int) -> int:
    """A seed per (run seed, round, stream): a resumed round draws what the first try drew."""
    return (seed * 1_000_003 + k * 7_919 + stream) % (2**63 - 1)


def round_config(base: TrainConfig, method: str, bbo: BboConfig, seed: int) -> TrainConfig:
    """The trainer's config for each fine-tuning round of ``method``."""
    spec = BBO_METHODS[method]
    train_method = spec.train_method or "sqdf"  # best_of_n never trains; any valid name
    # the shared method_params go to the methods that have such a setting (e.g. k: draft)
    known = {f.name for f in dataclasses.fields(METHODS[train_method].params)}
    method_params = {k: v for k, v in base.method_params.items() if k in known}
    if spec.whole_chain:
        method_params.setdefault("k", base.num_steps)
    values = {
        **base.to_dict(),
        "method": train_method,
        "method_params": method_params,
        "seed": seed,
        "steps": bbo.updates_per_round,
        "log_every": min(base.log_every, bbo.updates_per_round),
        "checkpoint_every": 0,  # the loop checkpoints once per round
        # the round's queried batch goes into the buffer whole
        "buffer_size": max(base.buffer_size, bbo.max_queries),
    }
    if method == "ddpo":  # one batch a round, the queried one, learnt from on-policy
        values.update(buffer="on_policy", replay_ratio=bbo.updates_per_round)
    return make_config(values, source=f"bbo method {method}")


def check_constant_lr(base: TrainConfig) -> None:
    """Each round is a ``train`` call of its own, which would restart a schedule."""
    if base.lr_schedule != "constant" or base.lr_warmup > 0:
        raise ConfigError(
            "sqdf bbo fine-tunes every round at a constant lr (each round is a run of its own, "
            "which would restart a schedule): set lr_schedule constant and lr_warmup 0, not "
            f"{base.lr_schedule} and {base.lr_warmup}"
        )


def check_round_config(cfg: TrainConfig) -> None:
    """What a round's fine-tuning cannot take (a run's settings that have no meaning here)."""
    if cfg.ema_decay > 0:
        raise ConfigError(
            "sqdf bbo keeps no moving average: each round fine-tunes from the last one's "
            f"weights and queries with them; drop ema_decay (now {cfg.ema_decay})"
        )
    if cfg.estimator == "exact":
        raise ConfigError(
            "sqdf bbo fine-tunes on a proxy reward, which has no closed-form soft value: use "
            "estimator tweedie or consistency, not exact"
        )
    if cfg.eval_every > 0:
        raise ConfigError(
            "sqdf bbo fine-tunes on the proxy, which --eval-every would score under the "
            f"oracle's name; drop eval_every (now {cfg.eval_every}): rounds.jsonl has the "
            "oracle's values"
        )


def build_oracle(bbo: BboConfig, cfg: TrainConfig, task: Task, used: int) -> Oracle:
    if bbo.oracle == "task":
        name = resolved_reward_name(cfg)
        fn = task_oracle(task, name)
    else:
        name = bbo.oracle
        fn = user_oracle(bbo.oracle, bbo.oracle_params, task.reward_conditions)
    return Oracle(name, fn, bbo.budget, drop_bad=bbo.drop_bad_queries, used=used)


def run_method(
    bbo: BboConfig,
    base: TrainConfig,
    method: str,
    seed: int,
    run: Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run (or, with ``resume``, continue) one method on one seed in folder ``run``; returns
    the per-round metrics, also in ``run/rounds.jsonl``. SIGTERM, SIGINT or SIGUSR1 stop it
    (``Preempted``) once the answers in hand are saved: after the round's queries, the
    fine-tuning update or the round's checkpoint in progress."""
    with stop_on_signals(), folder_writes(run, lambda: f"; {_continue_with(run)}"):
        return _run_rounds(bbo, base, method, seed, run, resume=resume, progress=progress)


def _continue_with(run: Path) -> str:
    """How to go on with ``run`` (an experiment's: its folder's resume)."""
    if run.parent.name == "runs":
        return f"continue with: sqdf bbo --resume {run.parent.parent}"
    return f"continue with run_method(..., resume=True) on {run}"


def _run_rounds(
    bbo: BboConfig,
    base: TrainConfig,
    method: str,
    seed: int,
    run: Path,
    *,
    resume: bool,
    progress: bool,
) -> list[dict[str, Any]]:
    spec = BBO_METHODS[method]
    check_constant_lr(base)
    cfg = round_config(base, method, bbo, seed)
    check_installed(parse_log_with(cfg.log_with))  # before a model is loaded
    check_round_config(cfg)
    procs = Processes(cfg.device)
    if procs.fsdp:
        raise ConfigError("sqdf bbo fine-tunes data-parallel; launch it without the FSDP config")
    if procs.is_main:
        run.mkdir(parents=True, exist_ok=True)
    procs.barrier()
    torch.manual_seed(seed)  # the same initial policy in every process
    task = build_task(dataclasses.replace(cfg, device=procs.device(cfg.device)))
    params = [p for p in task.policy.parameters() if p.requires_grad]
    state = TrainState(
        task=task,
        optimizer=make_optimizer(params, cfg, fused=use_fused(params)),
        buffer=make_buffer(cfg, task, run, procs.rank),
        generator=torch.Generator().manual_seed(rank_seed(seed, procs.rank)),
        scaler=loss_scaler(task),
    )
    start = 0
    ck = load_latest_checkpoint(run / "checkpoints") if resume else None
    if ck is not None:
        task.policy.load_state_dict(ck.policy)
        state.optimizer.load_state_dict(ck.optimizer)
        restore_process_states(procs, ck, state.buffer, state.generator, state.scaler, seed)
        start = ck.step
    rounds = load_rounds(run)
    if not start <= len(rounds) <= start + 1:  # only the round in flight may be unfinished
        raise SqdfError(
            f"cannot resume {run}: its checkpoint follows round {start - 1}, but it has "
            f"{len(rounds)} query file(s)"
        )
    done = _read_rows(run)
    if resume and done and "diverged" in done[-1]:
        return done  # it blew up before: a result, not something to retry
    # only the main process holds the oracle: every query is sent (and paid) once
    oracle = build_oracle(bbo, cfg, task, queries_spent(rounds)) if procs.is_main else None
    rows = [r for r in done if r["round"] < start]
    procs.barrier()  # every process has read the files before the main one rewrites them
    if procs.is_main:
        atomic_write_text(run / "rounds.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    # every round's conditions are the first of the same draw, so rounds of different sizes
    # (a query schedule) still share their conditions where they overlap
    g = torch.Generator().manual_seed(round_seed(seed, 0, 1))
    all_cond = task.sample_conditions(bbo.max_queries, g)
    features, dim = feature_map(task, cfg.task) if spec.proxy else (None, 0)
    t0 = time.perf_counter() - (rows[-1]["wall_s"] if rows else 0.0)

    for k in range(start, bbo.rounds):
        path = round_path(run, k)
        if procs.is_main:
            if k == len(rounds):
                rounds.append(_draw(task, spec, all_cond[: bbo.queries(k)], seed, k, path))
            # a signal stops the queries after the call in flight: the rest go on resume
            if _query(oracle, rounds[k], path, bbo.oracle_batch, run):
                row = _round_metrics(bbo, cfg, task, method, rounds, oracle, run, k, features, dim)
                row["wall_s"] = round(time.perf_counter() - t0, 3)
                rows.append(row)
                with (run / "rounds.jsonl").open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                if progress:
                    print(
                        f"sqdf bbo: {method} seed {seed} round {k}: {row['queries']} queries, "
                        f"oracle reward {row['oracle_mean']:.4g}",
                        flush=True,
                    )
        procs.barrier()  # the round's answers are on disk
        stop_here_if_signalled(
            procs, f"in round {k} of {method} seed {seed}, its answers saved; {_continue_with(run)}"
        )
        if not procs.is_main:
            rounds[k:] = [load_round(path)]
        if k == bbo.rounds - 1:
            break  # no query is left to measure what more fine-tuning would give
        if spec.train_method is not None:
            try:
                _fine_tune(
                    bbo, cfg, spec, state, rounds, run, k, features, dim, seed, progress, procs
                )
            except Preempted as stop:  # the round is fine-tuned again from its start
                raise Preempted(
                    stop.signum,
                    f"{stop} of round {k}'s fine-tuning ({method} seed {seed}; redone from its "
                    f"start on resume, its queries saved); {_continue_with(run)}",
                ) from None
            except DivergedError as err:
                # the method blew up fine-tuning after round k (in every process at once):
                # its curve ends there, and a resume does not retry it
                if procs.is_main:
                    rows[-1]["diverged"] = str(err)
                    text = "".join(json.dumps(r) + "\n" for r in rows)
                    atomic_write_text(run / "rounds.jsonl", text)
                    if progress:
                        print(f"sqdf bbo: {method} seed {seed} diverged after round {k}: {err}")
                procs.barrier()
                return rows
        _save_round(procs, state, oracle, run, k)
        stop_here_if_signalled(
            procs, f"after round {k} of {method} seed {seed}, checkpointed; {_continue_with(run)}"
        )
    procs.barrier()  # no process moves on before the run's files are complete
    return rows


def _save_round(
    procs: Processes, state: TrainState, oracle: Oracle | None, run: Path, k: int
) -> None:
    """The checkpoint after round ``k``: every process's buffer and stream, as the trainer's
    checkpoints keep them; the main process writes."""
    buffers, rngs = gather_process_states(procs, state.buffer, state.generator)
    if procs.is_main:
        save_checkpoint(
            run / "checkpoints",
            Checkpoint(
                step=k + 1,
                policy=state.task.policy.state_dict(),
                optimizer=state.optimizer.state_dict(),
                buffers=buffers,
                rngs=rngs,
                state={"queries": oracle.used, **scaler_state(state.scaler)},
            ),
            keep=2,
        )


def _read_rows(run: Path) -> list[dict[str, Any]]:
    path = run / "rounds.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a kill mid-write
    return rows


def _draw(task: Task, spec: BboMethod, cond: Tensor, seed: int, k: int, path: Path) -> RoundData:
    """The round's samples from the current model (best_of_n: the reference), all pending,
    written before the first query is sent."""
    g = torch.Generator().manual_seed(round_seed(seed, k, 0))
    trained = spec.train_method is not None
    traj = sample_trajectories(task, cond.shape[0], g, cond=cond, policy=trained, with_kl=trained)
    n = cond.shape[0]
    with torch.no_grad():  # in chunks: SD decodes every latent to a full-size image
        samples = torch.cat(
            [task.reward_input(x.to(task.device)).cpu() for x in traj.x0.split(FEATURE_CHUNK)]
        )
    data = RoundData(
        states=traj.states,
        cond=traj.cond,
        logp=traj.logp,
        kl=traj.kl if traj.kl is not None else torch.zeros_like(traj.logp),
        samples=samples,
        value=torch.full((n,), float("nan"), dtype=torch.float64),
        status=torch.full((n,), PENDING, dtype=torch.int8),
    )
    save_round(path, data)
    return data


def _query(oracle: Oracle, data: RoundData, path: Path, batch: int, run: Path) -> bool:
    """Send the pending samples, ``batch`` per call, saving the answers after each call;
    False if a stop signal came first and some are still pending."""
    pending = data.pending.nonzero().squeeze(1)
    size = batch or pending.numel()
    for chunk in pending.split(size) if pending.numel() else []:
        if received() is not None:
            return False
        try:
            reply = oracle.query(data.samples[chunk], data.cond[chunk])
        except OracleError as err:
            raise OracleError(
                f"{err}; the {oracle.used - chunk.numel()} queries answered before it are saved "
                f"in {run / 'queries'} (resume with sqdf bbo --resume, or allow "
                "--drop-bad-queries to exclude such samples)"
            ) from None
        data.value[chunk] = reply.values
        data.status[chunk] = torch.where(reply.ok, OK, EXCLUDED).to(torch.int8)
        save_round(path, data)
    return True


def _valid_data(rounds: list[RoundData]) -> tuple[Tensor, Tensor]:
    """(samples, values) of every valid query in ``rounds``."""
    samples = torch.cat([r.samples[r.ok] for r in rounds])
    values = torch.cat([r.value[r.ok] for r in rounds])
    return samples, values


FEATURE_CHUNK = 16  # samples per feature pass: a round of SD images at once would not fit


def _features_of(features: Any, samples: Tensor, device: torch.device) -> Tensor:
    with torch.no_grad():
        return torch.cat([features(s.to(device)).float() for s in samples.split(FEATURE_CHUNK)])


def _round_metrics(
    bbo: BboConfig,
    cfg: TrainConfig,
    task: Task,
    method: str,
    rounds: list[RoundData],
    oracle: Oracle,
    run: Path,
    k: int,
    features: Any,
    dim: int,
) -> dict[str, Any]:
    data = rounds[k]
    ok = data.ok
    if method == "best_of_n":  # each slot keeps its best sample so far
        values = torch.stack([r.value.nan_to_num(-math.inf) for r in rounds])  # (k+1, Q)
        best = values.argmax(0)
        shown_x0 = torch.stack([r.states[:, -1] for r in rounds])[best, torch.arange(best.shape[0])]
        shown = values.gather(0, best[None])[0]
        shown = shown[torch.isfinite(shown)]
        n = len(rounds)
        kl = math.log(n) - (n - 1) / n  # a bound on KL(best-of-n || ref), not measured
    else:
        shown_x0, shown = data.states[:, -1], data.value[ok]
        kl = float(data.kl.sum(1).mean())
    row: dict[str, Any] = {
        "round": k,
        "queries": oracle.used,
        "oracle_calls_this_process": oracle.calls,
        "oracle_mean": float(shown.mean()) if shown.numel() else math.nan,
        "oracle_std": float(shown.std()) if shown.numel() > 1 else math.nan,
        "fresh_oracle_mean": float(data.value[ok].mean()) if bool(ok.any()) else math.nan,
        "excluded": int((data.status == EXCLUDED).sum()),
        "excluded_total": sum(int((r.status == EXCLUDED).sum()) for r in rounds),
        "kl_path": kl,
    }
    # the proxy fitted after the previous round, judged on samples it has never seen
    previous = run / "proxy" / f"round_{k - 1:04d}.safetensors"
    if features is not None and previous.exists() and bool(ok.any()):
        ens = _ensemble(bbo, dim, task.device)
        ens.load_state_dict(load_weights(previous))
        with torch.no_grad():
            mean, std = ens.mean_std(_features_of(features, data.samples[ok], task.device))
        err = mean.cpu().double() - data.value[ok]
        row["proxy_rmse"] = float(err.pow(2).mean().sqrt())
        # > 0: the proxy promised more than the oracle gave (what fine-tuning exploits)
        row["proxy_bias"] = float(err.mean())
        row["proxy_std"] = float(std.mean())
    if cfg.task != "gmm2d" or bbo.oracle == "task":  # gmm2d's target is the task reward's
        ref_x0 = rounds[0].states[:, -1]
        m = min(ref_x0.shape[0], shown_x0.shape[0])  # rounds share their first conditions
        g = torch.Generator().manual_seed(round_seed(cfg.seed, k, 2))
        metrics = task.evaluate(shown_x0[:m], ref_x0[:m], data.cond[:m], g)
        row.update({key: v for key, v in metrics.items() if isinstance(v, float)})
    return row


def _ensemble(bbo: BboConfig, dim: int, device: torch.device) -> ProxyEnsemble:
    return ProxyEnsemble(dim, bbo.ensemble_size, bbo.proxy_hidden).to(device)


def _fine_tune(
    bbo: BboConfig,
    cfg: TrainConfig,
    spec: BboMethod,
    state: TrainState,
    rounds: list[RoundData],
    run: Path,
    k: int,
    features: Any,
    dim: int,
    seed: int,
    progress: bool,
    procs: Processes,
) -> None:
    task = state.task
    data = rounds[k]
    ok = data.ok.nonzero().squeeze(1)
    folder = run / "train" / f"round_{k:04d}"
    if procs.is_main:
        shutil.rmtree(folder, ignore_errors=True)  # a round cut short is redone from its start
    original = task.reward_model
    if spec.proxy:
        samples, values = _valid_data(rounds)
        if values.numel() < 2:
            return  # nothing to fit yet: the policy waits for data
        g = torch.Generator().manual_seed(round_seed(seed, k, 3))
        ens = _ensemble(bbo, dim, task.device)
        ens.fit(
            _features_of(features, samples, task.device),
            values,
            g,
            steps=bbo.proxy_steps,
            lr=bbo.proxy_lr,
            weight_decay=bbo.proxy_weight_decay,
        )
        if procs.is_main:  # every process fitted the same proxy on the same data
            (run / "proxy").mkdir(exist_ok=True)
            save_weights(ens.state_dict(), run / "proxy" / f"round_{k:04d}.safetensors")
        member = None
        if bbo.optimism == "sample":
            member = int(torch.randint(0, bbo.ensemble_size, (1,), generator=g))
        task.reward_model = ProxyReward(bbo.kappa, member, ens, features)
    elif ok.numel() == 0:
        return  # DDPO learns from the oracle's values; this round has none
    # the queried batch enters the buffer with the oracle's values (the truth, where known);
    # each process takes its share of it
    if ok.numel() >= procs.world:
        ok = ok[procs.rank :: procs.world]
    state.fresh = (data.trajectories(ok), data.value[ok].float())
    try:
        train(cfg, folder, progress=progress, state=state)
    finally:
        task.reward_model = original
        state.fresh = None
