"""Run under torchrun by tests/methods/test_grpo_parity.py: GRPO's advantages of this
process's newest batch, with groups and std taken over every process's batch.

    python grouped_gather.py OUT GROUP_BY      (every process of the launch runs this)

Process r holds 6 - 2r samples (lengths differ, as when a group's reward was not finite) with
the conditions and rewards of ``batch(r)``; it writes its advantages to OUT/r.json.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from sqdf.infra.distributed import Processes, end_process
from sqdf.methods import build_method_params
from sqdf.methods.grpo import group_advantages
from sqdf.training.grouped_cells import gather_newest


def batch(rank: int) -> tuple[list[int], list[float]]:
    cond = [[3, 3, 5, 5, 7, 7], [5, 5, 3, 3]][rank]
    reward = [[0.5, 1.5, 2.0, 4.0, 1.0, 1.0], [3.0, 9.0, -1.0, 0.25]][rank]
    return cond, reward


if __name__ == "__main__":
    out, group_by = Path(sys.argv[1]), sys.argv[2]
    procs = Processes("cpu")
    cond, reward = batch(procs.rank)
    n = len(cond)
    buffer = SimpleNamespace(newest=torch.arange(n), rewards=torch.tensor(reward),
                             cond=torch.tensor(cond))  # fmt: skip
    cells = SimpleNamespace(index=torch.arange(n), reward=torch.tensor(reward))
    params = build_method_params("grpo", {"group_size": 2, "group_by": group_by,
                                          "std": "population", "global_std": True})  # fmt: skip
    groups = gather_newest(buffer, params, procs).cell_groups(buffer, cells)
    adv = group_advantages(cells.reward, groups["group"], groups["batch_reward"],
                           groups["batch_group"], std="population", global_std=True)  # fmt: skip
    (out / f"{procs.rank}.json").write_text(json.dumps(adv.tolist()))
    end_process(0)
