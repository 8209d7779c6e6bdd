"""Run under torchrun by tests/test_distributed.py: the sqdf CLI in a process group whose
backend serves CUDA tensors only ("cuda:gloo"), as NCCL, the GPUs' backend, does: every
collective sqdf makes on CPU tensors (counters, statistics, buffers, random states) must
go through a group of its own.

    python cuda_only_group.py train ...      (the sqdf arguments)
"""

import sys

import torch.distributed as dist

from sqdf.cli import main
from sqdf.infra.distributed import end_process

dist.init_process_group(backend="cuda:gloo")  # Accelerate then joins this group as it is
end_process(main(sys.argv[1:]))
