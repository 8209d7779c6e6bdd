"""Replay strategies draw the cells they promise."""

import pytest
import torch

from sqdf.sampling.buffer import ReplayBuffer
from sqdf.sampling.sampler import Trajectories

T = 4


def batch(n: int, value: float) -> Trajectories:
    states = torch.full((n, T + 1, 2), value)
    return Trajectories(states=states, cond=torch.zeros(n, dtype=torch.long), kl=None)


def test_ring_overwrites_oldest_and_on_policy_sees_newest_only():
    buf = ReplayBuffer(capacity=6, strategy="on_policy", num_steps=T, gamma=1.0)
    buf.add(batch(4, 1.0), torch.ones(4))
    buf.add(batch(4, 2.0), torch.ones(4) * 2)
    assert buf.size == 6
    assert sorted(buf.states[:, 0, 0].tolist()) == [1.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    cells = buf.sample_cells(200, torch.Generator().manual_seed(0))
    assert bool((cells.x_t == 2.0).all())
    assert bool((cells.step >= 0).all() and (cells.step < T).all())


def test_uniform_draws_every_trajectory_and_step():
    buf = ReplayBuffer(capacity=8, strategy="uniform", num_steps=T, gamma=1.0)
    buf.add(batch(4, 1.0), torch.ones(4))
    buf.add(batch(4, 2.0), torch.ones(4))
    cells = buf.sample_cells(4000, torch.Generator().manual_seed(0))
    assert set(cells.index.tolist()) == set(range(8))
    counts = torch.bincount(cells.step, minlength=T).double() / 4000
    torch.testing.assert_close(
        counts, torch.full((T,), 0.25, dtype=torch.float64), atol=0.03, rtol=0
    )


def test_prioritized_weights_are_reward_times_discount():
    gamma = 0.5
    buf = ReplayBuffer(capacity=2, strategy="prioritized", num_steps=T, gamma=gamma)
    buf.add(batch(2, 0.0), torch.tensor([-1.0, 2.0]))  # shifted rewards: ~0 and 3
    n = 20000
    cells = buf.sample_cells(n, torch.Generator().manual_seed(0))
    assert float((cells.index == 0).double().mean()) < 1e-3
    disc = gamma ** (T - 1 - torch.arange(T, dtype=torch.float64))
    expected = disc / disc.sum()
    freq = torch.bincount(cells.step, minlength=T).double() / n
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_state_round_trip():
    buf = ReplayBuffer(capacity=5, strategy="uniform", num_steps=T, gamma=1.0)
    buf.add(batch(3, 1.5), torch.arange(3.0))
    other = ReplayBuffer(capacity=5, strategy="uniform", num_steps=T, gamma=1.0)
    other.load_state_dict(buf.state_dict())
    a = buf.sample_cells(10, torch.Generator().manual_seed(4))
    b = other.sample_cells(10, torch.Generator().manual_seed(4))
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.reward, b.reward)
    assert (other.size, other.ptr) == (3, 3)


def test_bad_use():
    with pytest.raises(ValueError, match="strategy"):
        ReplayBuffer(4, "lifo", T, 1.0)
    buf = ReplayBuffer(2, "uniform", T, 1.0)
    with pytest.raises(RuntimeError, match="empty"):
        buf.sample_cells(1, torch.Generator())
    with pytest.raises(ValueError, match="capacity"):
        buf.add(batch(3, 0.0), torch.zeros(3))


def test_prioritized_uses_non_negative_rewards_as_they_are():
    buf = ReplayBuffer(capacity=2, strategy="prioritized", num_steps=T, gamma=1.0)
    buf.add(batch(2, 0.0), torch.tensor([1.2, 1.6]))
    cells = buf.sample_cells(40000, torch.Generator().manual_seed(0))
    assert float((cells.index == 0).double().mean()) == pytest.approx(1.2 / 2.8, abs=0.01)
