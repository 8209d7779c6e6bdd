"""Run under torchrun by tests/methods/test_grpo_parity.py: GRPO with groups and std spanning
the processes, where process 1's loss is not finite on its first micro-batch of every update
(it leaves its micro-batches early) while process 0 runs all of its own.

    python grouped_skip.py OUT      (every process of the launch runs this)

A watchdog ends a process that waits in a collective for 120 s (a hang fails the launch);
each process writes the number of its gathers of the newest batch to OUT/r.json.
"""

import dataclasses
import faulthandler
import json
import sys
from pathlib import Path

import sqdf.training.gradients
import sqdf.training.grouped_cells
import sqdf.training.trainer
from sqdf.infra.distributed import Processes, end_process
from sqdf.methods import METHODS
from sqdf.run.settings import make_config

STEPS = 3

if __name__ == "__main__":
    faulthandler.dump_traceback_later(120, exit=True)
    out = Path(sys.argv[1])
    rank = Processes("cpu").rank
    gathers = 0
    gather = sqdf.training.grouped_cells.gather_varying

    def counted(procs, t):
        global gathers
        gathers += 1
        return gather(procs, t)

    sqdf.training.grouped_cells.gather_varying = counted
    loss = METHODS["grpo"].loss

    def failing(*args, **kwargs):
        value, stats = loss(*args, **kwargs)
        return (value * float("nan") if rank == 1 else value), stats

    sqdf.training.gradients.METHODS = {
        **METHODS,
        "grpo": dataclasses.replace(METHODS["grpo"], loss=failing),
    }
    cfg = make_config(dict(
        task="gmm2d", method="grpo", buffer="on_policy", num_steps=4, steps=STEPS, batch_size=8,
        buffer_size=8, grad_accum=3, log_every=1, checkpoint_every=0, device="cpu",
        estimator="tweedie", task_params={"hidden": 8, "process": "flow"}, max_skips=100,
        method_params={"group_size": 4, "global_std": True, "group_by": "condition",
                       "std": "population"},
    ))  # fmt: skip
    sqdf.training.trainer.train(cfg, out / "run", progress=False)
    (out / f"{rank}.json").write_text(json.dumps({"gathers": gathers, "steps": STEPS}))
    end_process(0)
