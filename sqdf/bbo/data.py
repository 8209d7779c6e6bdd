"""The query data set, persisted as it arrives: one safetensors file per round.

A round's file is written when its samples are drawn (every value pending) and rewritten,
atomically, after each oracle call, so a crash loses at most the call in flight, and a
resumed run sends only the samples still pending. The file keeps the whole trajectories
(training replays them), what the oracle saw (``samples``) and its answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from sqdf.errors import SqdfError
from sqdf.infra.atomic import atomic_write
from sqdf.sampling.sampler import Trajectories

PENDING, OK, EXCLUDED = 0, 1, 2


@dataclass
class RoundData:
    states: Tensor  # (Q, T+1, ...) model space, x_T ... x_0
    cond: Tensor  # (Q,)
    logp: Tensor  # (Q, T) the sampler's log-likelihood of each step
    kl: Tensor  # (Q, T) per-step KL(policy || reference) along the path
    samples: Tensor  # (Q, ...) x_0 as the oracle sees it (task.reward_input)
    value: Tensor  # (Q,) float64 oracle values; NaN while pending or when excluded
    status: Tensor  # (Q,) int8: PENDING, OK or EXCLUDED

    @property
    def ok(self) -> Tensor:
        return self.status == OK

    @property
    def pending(self) -> Tensor:
        return self.status == PENDING

    def trajectories(self, index: Tensor) -> Trajectories:
        return Trajectories(self.states[index], self.cond[index], self.kl[index], self.logp[index])


def round_path(run: Path, k: int) -> Path:
    return run / "queries" / f"round_{k:04d}.safetensors"


def save_round(path: Path, data: RoundData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(data, name).contiguous() for name in RoundData.__dataclass_fields__}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def load_round(path: Path) -> RoundData:
    try:
        tensors = load_file(str(path))
        return RoundData(**{name: tensors[name] for name in RoundData.__dataclass_fields__})
    except Exception as err:  # a foreign or damaged file: say which one
        raise SqdfError(f"cannot read query data {path}: {str(err).splitlines()[0]}") from None


def load_rounds(run: Path) -> list[RoundData]:
    """Every round file of a run, in order (a resumed run's partly queried one included)."""
    rounds = []
    while round_path(run, len(rounds)).exists():
        rounds.append(load_round(round_path(run, len(rounds))))
    return rounds


def queries_spent(rounds: list[RoundData]) -> int:
    return sum(int((~r.pending).sum()) for r in rounds)
