"""Replay buffer of past trajectories; each update draws (trajectory, step) cells from it.

Strategies (how a cell is chosen):
- ``uniform``: any step of any stored trajectory, equally likely;
- ``on_policy``: only trajectories of the newest batch;
- ``prioritized``: cell (i, k) with weight r_i * gamma^(T-1-k). The paper's weight assumes
  non-negative rewards; when the buffer holds a negative one, all rewards are shifted by the
  buffer's minimum first (a documented choice), otherwise they are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sqdf.sampler import Trajectories


@dataclass
class Cells:
    x_t: Tensor  # (B, ...) state before step k
    x_next: Tensor | None  # (B, ...) state the sampler reached after step k (None: truncated)
    step: Tensor  # (B,) long, k in 0..T-1
    cond: Tensor  # (B,)
    reward: Tensor  # (B,) reward of the trajectory's final sample
    index: Tensor  # (B,) slot in the buffer
    logp: Tensor | None = None  # (B,) log-likelihood of x_next under the sampling policy


class ReplayBuffer:
    def __init__(self, capacity: int, strategy: str, num_steps: int, gamma: float):
        if strategy not in ("uniform", "on_policy", "prioritized"):
            raise ValueError(f"unknown buffer strategy {strategy!r}")
        self.capacity = capacity
        self.strategy = strategy
        self.num_steps = num_steps
        self.gamma = gamma
        self.states: Tensor | None = None  # (capacity, T+1, ...)
        self.cond: Tensor | None = None
        self.rewards = torch.zeros(capacity)
        self.logp: Tensor | None = None  # (capacity, T)
        self.size = 0
        self.ptr = 0
        self.newest = torch.zeros(0, dtype=torch.long)

    def add(self, traj: Trajectories, rewards: Tensor) -> None:
        n = traj.states.shape[0]
        if n > self.capacity:
            raise ValueError(f"batch of {n} trajectories exceeds buffer capacity {self.capacity}")
        if self.states is None:
            self.states = torch.zeros(
                (self.capacity, *traj.states.shape[1:]), dtype=traj.states.dtype
            )
            self.cond = torch.zeros((self.capacity, *traj.cond.shape[1:]), dtype=traj.cond.dtype)
            self.logp = torch.zeros((self.capacity, self.num_steps))
        idx = (self.ptr + torch.arange(n)) % self.capacity
        self.states[idx] = traj.states
        self.cond[idx] = traj.cond
        if traj.logp is not None:
            self.logp[idx] = traj.logp.float()
        self.rewards[idx] = rewards.detach().float().cpu()
        self.ptr = int((self.ptr + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)
        self.newest = idx

    def sample_cells(self, n: int, generator: torch.Generator) -> Cells:
        if self.size == 0:
            raise RuntimeError("sample_cells on an empty buffer")
        T = self.num_steps
        if self.strategy == "prioritized":
            r = self.rewards[: self.size]
            shifted = r - min(float(r.min()), 0.0) + 1e-6
            disc = self.gamma ** (T - 1 - torch.arange(T, dtype=torch.float64))
            w = (shifted.double()[:, None] * disc[None]).flatten()
            flat = torch.multinomial(w, n, replacement=True, generator=generator)
            index, step = flat // T, flat % T
        else:
            pool = self.newest if self.strategy == "on_policy" else torch.arange(self.size)
            index = pool[torch.randint(0, pool.shape[0], (n,), generator=generator)]
            step = torch.randint(0, T, (n,), generator=generator)
        return Cells(
            x_t=self.states[index, step],
            x_next=self.states[index, step + 1],
            step=step,
            cond=self.cond[index],
            reward=self.rewards[index],
            index=index,
            logp=self.logp[index, step],
        )

    def state_dict(self) -> dict[str, Tensor]:
        if self.states is None:
            return {}
        return {
            "states": self.states,
            "cond": self.cond,
            "rewards": self.rewards,
            "logp": self.logp,
            "newest": self.newest,
            "size_ptr": torch.tensor([self.size, self.ptr]),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not state:
            return
        self.states = state["states"].clone()
        self.cond = state["cond"].clone()
        self.rewards = state["rewards"].clone()
        self.logp = state["logp"].clone()
        self.newest = state["newest"].clone()
        self.size, self.ptr = (int(v) for v in state["size_ptr"])
