"""Run under torchrun by tests/test_distributed.py: one SQDF update, this process's shard.

    python one_update.py OUT B          (every process of the launch runs this)

The 2B cells are drawn from a fixed generator in every process; process r keeps cells
r*B..(r+1)*B-1 and draws its loss noise from Generator(100 + r). Process 0 saves the
updated parameters to OUT. Launched with ACCELERATE_USE_FSDP=true the policy is sharded.
"""

import sys

import torch
from safetensors.torch import save_file

from sqdf.infra.distributed import Processes, end_process
from sqdf.methods import METHODS, build_method_params
from sqdf.training.update import average_and_clip
from tests.distributed.shards import CFG, global_cells, shard

out, b = sys.argv[1], int(sys.argv[2])
procs = Processes("cpu")
torch.manual_seed(CFG.seed)
from sqdf.tasks import build_task  # noqa: E402 - after the seed, like the trainer

task = build_task(CFG)
params = [p for p in task.policy.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=CFG.lr, weight_decay=CFG.weight_decay)
params = procs.prepare(task.policy, optimizer)  # shards the policy under FSDP, else nothing
cells = shard(global_cells(task, procs.world * b), procs.rank, b)
loss, _ = METHODS["sqdf"].loss(
    task,
    cells,
    CFG,
    build_method_params("sqdf", {}),
    torch.Generator().manual_seed(100 + procs.rank),
)
loss.backward()
average_and_clip(procs, params, CFG.max_grad_norm)
optimizer.step()
state = procs.model_state(task.policy)  # gathered from the shards under FSDP
if procs.is_main:
    save_file({k: v.contiguous() for k, v in state.items()}, out)
procs.barrier()
end_process(0)
