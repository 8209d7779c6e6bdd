"""Where the replay buffer keeps its states: in host memory or in memory-mapped files, in
float32 or a 16-bit dtype. The store changes neither the cells drawn nor a run's result; a
disk buffer resumes exactly, even when the run wrote past its last checkpoint; a missing,
truncated or overwritten shard is a clear error."""

import dataclasses
import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sqdf import ConfigError, SqdfError, TrainConfig, read_metrics, train
from sqdf.cli import main
from sqdf.run.settings import make_config
from sqdf.sampling.buffer import DiskStore, MemoryStore, ReplayBuffer
from sqdf.sampling.sampler import Trajectories
from sqdf.training import dry_run
from sqdf.training.start import make_buffer

T = 5
SHAPE = (3, 4)


def batch(n: int, g: torch.Generator) -> Trajectories:
    return Trajectories(
        states=torch.randn((n, T + 1, *SHAPE), generator=g),
        cond=torch.randint(0, 10, (n,), generator=g),
        kl=None,
        logp=torch.randn((n, T), generator=g),
    )


def fill(buffers, adds: int, seed: int = 0, checkpoint_at=()) -> list[torch.Tensor]:
    """The same batches into every buffer; returns each slot's source trajectory (the
    reference the cells are checked against). ``checkpoint_at``: adds after which the
    buffers' state is taken, as a checkpoint takes it (a disk store then keeps those rows)."""
    g = torch.Generator().manual_seed(seed)
    capacity = buffers[0].capacity
    source = [None] * capacity
    ptr = 0
    for i in range(adds):
        n = int(torch.randint(1, 5, (1,), generator=g))
        traj = batch(n, g)
        rewards = torch.rand(n, generator=g) - 0.3
        for b in buffers:
            b.add(traj, rewards)
        for j in range(n):
            source[(ptr + j) % capacity] = traj.states[j]
        ptr = (ptr + n) % capacity
        if i in checkpoint_at:
            for b in buffers:
                b.state_dict()
    return source


@pytest.mark.parametrize("strategy", ["uniform", "prioritized", "on_policy"])
def test_disk_and_memory_stores_draw_the_same_cells(tmp_path, strategy):
    mem = ReplayBuffer(8, strategy, T, 0.9, MemoryStore(torch.float32))
    disk = ReplayBuffer(8, strategy, T, 0.9, DiskStore(tmp_path, torch.float32))
    source = fill([mem, disk], adds=9, checkpoint_at={2, 5})  # wraps the ring several times
    for seed in range(3):
        a = mem.sample_cells(64, torch.Generator().manual_seed(seed))
        b = disk.sample_cells(64, torch.Generator().manual_seed(seed))
        for field in ("x_t", "x_next", "step", "cond", "reward", "index", "logp"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        # and they are the states of the trajectories stored in those slots
        want = torch.stack([source[i][k] for i, k in zip(b.index, b.step, strict=True)])
        assert torch.equal(b.x_t, want)
        want = torch.stack([source[i][k + 1] for i, k in zip(b.index, b.step, strict=True)])
        assert torch.equal(b.x_next, want)
    assert torch.equal(mem.states, disk.states)


@pytest.mark.parametrize("store", ["memory", "disk"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_store_rounds_once_and_takes_half_the_bytes(tmp_path, store, dtype):
    def make(d):
        kept = MemoryStore(d) if store == "memory" else DiskStore(tmp_path / str(d), d)
        return ReplayBuffer(8, "uniform", T, 1.0, kept)

    half, full = make(dtype), make(torch.float32)
    source = fill([half, full], adds=6)
    cells = half.sample_cells(64, torch.Generator().manual_seed(0))
    assert cells.x_t.dtype == torch.float32  # what the losses compute in
    want = torch.stack([source[i][k] for i, k in zip(cells.index, cells.step, strict=True)])
    assert torch.equal(cells.x_t, want.to(dtype).float())  # rounded once, to nearest
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(cells.x_t, want, rtol=eps, atol=torch.finfo(dtype).tiny)
    if store == "memory":
        sizes = [b.store.states.untyped_storage().nbytes() for b in (half, full)]
    else:  # the files as they are on disk, header aside
        sizes = [os.path.getsize(b.store.path) - b.store.states.offset for b in (half, full)]
    rows = 8 if store == "memory" else 2 * 8  # the disk store's file: twice the capacity
    assert sizes[0] * 2 == sizes[1] == rows * (T + 1) * np.prod(SHAPE) * 4


def test_a_checkpoint_keeps_its_rows_and_resume_checks_the_files(tmp_path):
    def disk():
        return ReplayBuffer(6, "uniform", T, 1.0, DiskStore(tmp_path, torch.float32))

    buf, mem = disk(), ReplayBuffer(6, "uniform", T, 1.0, MemoryStore(torch.float32))
    fill([buf, mem], adds=4, seed=1)
    state, kept = buf.state_dict(), mem.states.clone()
    g = torch.Generator().manual_seed(9)
    for _ in range(5):  # after the checkpoint: the ring wraps over every slot it names
        traj = batch(3, g)
        buf.add(traj, torch.zeros(3))
    assert buf.store.tags.shape[0] == 12  # two rows per slot, no more
    resumed = disk()
    resumed.load_state_dict(state)
    assert torch.equal(resumed.states, kept)  # as at the checkpoint, not as after it

    newer = buf.state_dict()  # a newer checkpoint: the older one's rows are free again
    for _ in range(4):
        buf.add(batch(3, g), torch.zeros(3))
    with pytest.raises(SqdfError, match=r"trajectories the checkpoint names in .*states\.npy "
                       r"were overwritten after it"):  # fmt: skip
        disk().load_state_dict(state)
    disk().load_state_dict(newer)

    buf.store.tags_path.unlink()
    with pytest.raises(SqdfError, match=r"its shard .*tags\.npy is missing"):
        disk().load_state_dict(newer)
    buf.store.states.flush()
    with open(buf.store.path, "r+b") as fh:
        fh.truncate(os.path.getsize(buf.store.path) - 10)
    with pytest.raises(
        SqdfError, match=r"states\.npy is truncated \(3,574 bytes, 3,584 expected\)"
    ):
        disk().load_state_dict(newer)


def test_stores_refuse_each_others_checkpoints(tmp_path):
    mem = ReplayBuffer(4, "uniform", T, 1.0, MemoryStore(torch.float32))
    disk = ReplayBuffer(4, "uniform", T, 1.0, DiskStore(tmp_path, torch.float32))
    fill([mem, disk], adds=2)
    with pytest.raises(SqdfError, match="keeps its states in memory"):
        ReplayBuffer(4, "uniform", T, 1.0, DiskStore(tmp_path)).load_state_dict(mem.state_dict())
    with pytest.raises(SqdfError, match="keeps its states on disk"):
        ReplayBuffer(4, "uniform", T, 1.0).load_state_dict(disk.state_dict())


def tiny(**kw) -> TrainConfig:
    # a buffer of two batches: full after two updates, so every later add overwrites a slot
    values = dict(num_steps=6, steps=8, batch_size=8, buffer_size=16, log_every=1,
                  checkpoint_every=3, device="cpu", estimator="tweedie", buffer="prioritized",
                  task_params={"hidden": 16})  # fmt: skip
    return TrainConfig(**{**values, **kw})


def weights(run):
    return load_file(str(run / "final" / "policy.safetensors"))


def test_a_disk_run_resumes_to_the_uninterrupted_result(tmp_path):
    straight = train(tiny(buffer_store="disk"), tmp_path / "straight", progress=False)
    # stops at update 5: its last checkpoint is at 3, and updates 4 and 5 added to the buffer
    # after it (over slots the checkpoint holds), as a run killed there would have
    part = train(tiny(buffer_store="disk", steps=5), tmp_path / "part", progress=False)
    # a finished run checkpoints its last update before final/: a run killed at 5 has neither
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == [
        "step_0000003", "step_0000005"
    ]  # fmt: skip
    shutil.rmtree(part / "checkpoints" / "step_0000005")
    shutil.rmtree(part / "final")
    train(tiny(buffer_store="disk"), part, resume=True, progress=False)
    a, b = weights(straight), weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_metrics(part)] == [r["loss"] for r in read_metrics(straight)]
    # and the store changes nothing: a memory run trains bitwise the same
    memory = weights(train(tiny(), tmp_path / "memory", progress=False))
    assert all(torch.equal(a[k], memory[k]) for k in a)
    checkpoint = load_file(str(part / "checkpoints" / "step_0000006" / "buffer.safetensors"))
    assert "states" not in checkpoint and checkpoint["rows"].shape == (16,)
    assert sorted(p.name for p in (part / "buffer").iterdir()) == ["states.npy", "tags.npy"]


def test_a_missing_shard_stops_the_resume_with_its_name(tmp_path):
    run = train(tiny(buffer_store="disk", steps=3), tmp_path / "run", progress=False)
    (run / "buffer" / "states.npy").unlink()
    with pytest.raises(SqdfError, match=r"shard .*buffer/states\.npy is missing"):
        train(tiny(buffer_store="disk", steps=4), run, resume=True, progress=False)


def test_a_run_from_before_the_buffer_keys_resumes(tiny_config, tmp_path):
    """config.json and checkpoints written before buffer_store and buffer_dtype existed."""
    cfg = dataclasses.replace(tiny_config, steps=3)
    straight = train(dataclasses.replace(tiny_config), tmp_path / "straight", progress=False)
    run = train(cfg, tmp_path / "old", progress=False)
    path = run / "config.json"
    doc = json.loads(path.read_text())
    for key in ("buffer_store", "buffer_dtype"):
        del doc["train"][key]
    path.write_text(json.dumps(doc))
    buffer = load_file(str(run / "checkpoints" / "step_0000003" / "buffer.safetensors"))
    assert set(buffer) == {"states", "cond", "rewards", "logp", "newest", "size_ptr"}
    train(tiny_config, run, resume=True, progress=False)
    a, b = weights(straight), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_takes_the_task_dtype(tmp_path):
    class Task:
        dtype = torch.bfloat16

    cfg = tiny(buffer_dtype="auto", buffer_store="disk")
    assert make_buffer(cfg, Task(), tmp_path, 1).store.dtype == torch.bfloat16
    assert make_buffer(cfg, object(), tmp_path, 0).store.dtype == torch.float32
    disk = make_buffer(cfg, Task(), tmp_path, 1).store
    assert disk.path == tmp_path / "buffer" / "states.rank1.npy"
    memory = make_buffer(tiny(buffer_dtype="float16"), Task(), tmp_path, 0).store
    assert not memory.on_disk and memory.dtype == torch.float16
    # a likelihood-ratio method keeps its states as sampled, auto or not
    ddpo = tiny(method="ddpo", buffer="on_policy", buffer_dtype="auto")
    assert make_buffer(ddpo, Task(), tmp_path, 0).store.dtype == torch.float32
    with pytest.raises(ConfigError, match="method 'ddpo' takes likelihood ratios"):
        make_config({"method": "ddpo", "buffer": "on_policy", "buffer_dtype": "bfloat16"})
    # a GPU run is planned on a machine without one: auto is the sd task's bfloat16 there
    plan = TrainConfig(task="sd", device="cuda", buffer_dtype="auto")
    assert dry_run.buffer_dtype(plan) == "bfloat16"


def test_a_full_disk_is_an_error_when_the_store_is_made(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    buffer = make_buffer(tiny(buffer_store="disk"), object(), tmp_path, 0)
    with pytest.raises(SqdfError, match=r"cannot reserve .* GiB for the replay buffer's .*"
                       r"states.npy: No space left on device"):  # fmt: skip
        buffer.add(batch(4, torch.Generator().manual_seed(0)), torch.zeros(4))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("buffer_store", "ram", "unknown buffer_store 'ram'; known: memory, disk"),
        ("buffer_dtype", "int8", "unknown buffer_dtype 'int8'; known: float32, bfloat16, "
         "float16, auto"),
    ],
)  # fmt: skip
def test_bad_values_are_named(key, value, message, capsys):
    with pytest.raises(ConfigError, match=message):
        tiny(**{key: value})
    assert main(["train", f"--{key.replace('_', '-')}", value, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_dry_run_sizes_the_store(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--buffer-store", "disk", "--buffer-dtype", "bfloat16", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "buffer_store                 disk" in out
    assert "1,024 trajectories x 51 states x 2 values x 2 bytes (bfloat16)" in out
    assert "on disk in RUN/buffer/" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--buffer-dtype" in capsys.readouterr().out
