"""torchrun job for tests/test_faults.py: `fault_cases.abort_rank0` on every rank, then a barrier.
Arguments: the marker path ('-' for none: abort every time), and optionally 'rank1-raises'."""

import sys

import torch.distributed as dist
from fault_cases import abort_rank0

if __name__ == "__main__":
    dist.init_process_group("gloo")
    abort_rank0(None if sys.argv[1] == "-" else sys.argv[1], rank1_raises=sys.argv[2:] == ["rank1-raises"])
    dist.barrier()
    dist.destroy_process_group()
