"""Host memory and disk per stored trajectory of the replay buffer, for each store and dtype,
at the latent sizes of large models, measured on buffers actually filled.

    python benchmarks/buffer_memory.py --out benchmarks/results/buffer-memory-cpu.json

For each shape (SD 1.5 at 512 px: 4x64x64; SDXL at 1024 px: 4x128x128; FLUX at 1024 px: its
packed 4096x64 latent), 51 states (50 steps) and each store (memory, disk) and dtype
(float32, bfloat16, float16), a buffer of ``--trajectories`` slots is filled with that many
random trajectories through ``ReplayBuffer.add``, then measured:

- host bytes: the allocated storage of every tensor the buffer holds (the states in the memory
  store; rewards, conditions, log-probabilities, and the disk store's row map, in both);
- RssAnon growth: the process's anonymous resident memory over the fill, the kernel's view of
  the same (a disk store's pages in the page cache are not anonymous: the OS drops them when
  it needs the memory);
- disk bytes: the blocks allocated to the store's files (st_blocks), and their apparent size
  (the disk store reserves twice the capacity, so that a checkpoint's rows survive until the
  next one: the second half is written only by rows added between checkpoints).

Every figure is per stored trajectory; the table scales them to 1,024 trajectories.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # name: (latent shape, what it is)
    "sd15": ((4, 64, 64), "SD 1.5 at 512 px"),
    "sdxl": ((4, 128, 128), "SDXL at 1024 px"),
    "flux": ((4096, 64), "FLUX at 1024 px (packed)"),
}
STORES = ("memory", "disk")
DTYPES = ("float32", "bfloat16", "float16")


def rss_anon() -> int:
    """The process's anonymous resident bytes (Linux; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def host_bytes(buffer) -> int:
    """Allocated bytes of every tensor the buffer and its store hold in memory."""
    import torch

    seen, total = set(), 0
    for obj in (buffer, buffer.store):
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def measure(shape: tuple[int, ...], store: str, dtype: str, n: int, steps: int, tmp: Path) -> dict:
    import torch

    from sqdf.sampling.buffer import STATE_DTYPES, DiskStore, MemoryStore, ReplayBuffer
    from sqdf.sampling.sampler import Trajectories

    g = torch.Generator().manual_seed(0)
    traj = Trajectories(
        states=torch.randn((n, steps + 1, *shape), generator=g),  # as the sampler gives them
        cond=torch.arange(n),
        kl=None,
        logp=torch.randn((n, steps), generator=g),
    )
    folder = tmp / f"{store}-{dtype}-{'x'.join(map(str, shape))}"
    kept = (
        DiskStore(folder, STATE_DTYPES[dtype])
        if store == "disk"
        else MemoryStore(STATE_DTYPES[dtype])
    )
    gc.collect()
    before = rss_anon()
    buffer = ReplayBuffer(n, "uniform", steps, 1.0, kept)
    buffer.add(traj, torch.zeros(n))
    buffer.state_dict()  # as a checkpoint: the disk store's files flushed
    gc.collect()
    grown = rss_anon() - before
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    allocated = sum(f.stat().st_blocks * 512 for f in files)
    apparent = sum(f.stat().st_size for f in files)
    result = {
        "shape": list(shape),
        "store": store,
        "dtype": dtype,
        "host_bytes_per_trajectory": host_bytes(buffer) // n,
        "rss_anon_growth_per_trajectory": grown // n,
        "disk_bytes_per_trajectory": allocated // n,
        "disk_reserved_per_trajectory": apparent // n,
    }
    del buffer, kept, traj
    gc.collect()
    return result


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trajectories", type=int, default=4, help="buffer capacity, filled")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps (states: steps + 1)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--dir", default=None, help="folder for the disk store (default: a temp)")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    args = ap.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape {unknown[0]!r}; known: {', '.join(SHAPES)}")
    if args.trajectories < 1 or args.steps < 1:
        ap.error("--trajectories and --steps must be >= 1")
    if args.one:  # a child process: one measurement, as JSON on stdout's last line
        name, store, dtype = args.one.split(",")
        shape = SHAPES[name][0]
        r = measure(shape, store, dtype, args.trajectories, args.steps, Path(args.dir))
        print(json.dumps(r))
        return 0
    import torch

    results = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="sqdf-buffer-") as tmp:
        for name in shapes:
            for store in STORES:
                for dtype in DTYPES:
                    # a process each, so that its RssAnon growth is its own buffer's
                    cmd = [sys.executable, __file__, "--trajectories", str(args.trajectories),
                           "--steps", str(args.steps), "--dir", tmp,
                           "--one", f"{name},{store},{dtype}"]  # fmt: skip
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode != 0:
                        print(done.stderr[-2000:], file=sys.stderr)
                        return 1
                    r = json.loads(done.stdout.strip().splitlines()[-1])
                    results.append({"model": name, "label": SHAPES[name][1], **r})
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({platform.processor() or platform.machine()}), torch {torch.__version__}",
        "trajectories": args.trajectories,
        "states": args.steps + 1,
        "command": " ".join(["python", "benchmarks/buffer_memory.py", *(argv or sys.argv[1:])]),
        "results": results,
    }
    scale = 1024
    print(
        f"replay buffer per trajectory ({doc['states']} states), measured on "
        f"{args.trajectories} stored trajectories; GiB columns x {scale:,} trajectories"
    )
    print("| model | latent | store | dtype | host bytes/traj. | host GiB | RssAnon GiB | "
          "disk GiB (allocated) | disk GiB (reserved) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['label']} | {'x'.join(map(str, r['shape']))} | {r['store']} | "
              f"{r['dtype']} | {r['host_bytes_per_trajectory']:,} | "
              f"{gib(r['host_bytes_per_trajectory'] * scale)} | "
              f"{gib(max(r['rss_anon_growth_per_trajectory'], 0) * scale)} | "
              f"{gib(r['disk_bytes_per_trajectory'] * scale)} | "
              f"{gib(r['disk_reserved_per_trajectory'] * scale)} |")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
