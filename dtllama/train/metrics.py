"""What a run reports: peak memory, a step's FLOPs and MFU, means over a mesh, and the metrics files.

Rank 0 writes one JSON line per step (`--metrics`) and, with `--tensorboard`, the row's numbers as scalars; the
other ranks' writer does nothing, so every rank can call it.
"""

from __future__ import annotations

import inspect
import json
import resource

import torch
import torch.distributed as dist

PEAK_FLOPS = 989e12  # bf16 dense, H100/H200 SXM: the MFU reference


def peak_memory_gib(device: torch.device) -> float:
    """The accelerator's peak allocation, or on the host this process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def active_params(config) -> int:
    """Parameters one token's forward reads: a MoE config counts its top-k experts (`num_params(active=True)`)."""
    if "active" in inspect.signature(config.num_params).parameters:
        return config.num_params(active=True)
    return config.num_params()


def step_flops(config, lengths: list[int]) -> float:
    """Training FLOPs of a step over sequences of `lengths`, torchtitan's count: 6 per active parameter and token
    (embedding excluded) plus causal attention's 12 * layers * hidden per token pair of each sequence."""
    h, L = config.hidden_size, config.num_hidden_layers
    dense = 6 * (active_params(config) - config.vocab_size * h) * sum(lengths)
    return dense + 12 * L * h * sum(n**2 for n in lengths)


def mfu(flops: float, seconds: float, world_size: int, device: torch.device) -> float | None:
    """Model FLOPs utilization against `PEAK_FLOPS` per rank; None off the GPU (no meaningful peak)."""
    return flops / seconds / (PEAK_FLOPS * world_size) if device.type == "cuda" else None


def mean_over(x: float, mesh) -> float:
    """The mean of a per-rank number over the ranks of `mesh`."""
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, group=mesh.get_group())
    return float(t) / mesh.size()


def max_over(x: float, mesh) -> float:
    """The largest of a per-rank number over the ranks of `mesh`."""
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=mesh.get_group())
    return float(t)


class MetricsWriter:
    """Rows of metrics to a JSONL file and TensorBoard (rank 0; `append` continues a resumed run's file)."""

    def __init__(self, jsonl: str | None, tensorboard: str | None = None, append: bool = False):
        rank0 = dist.get_rank() == 0
        self.file = open(jsonl, "a" if append else "w") if jsonl and rank0 else None
        self.board = _summary_writer(tensorboard) if tensorboard and rank0 else None

    def write(self, row: dict, step_key: str = "step") -> None:
        """One row; TensorBoard gets its numbers at step `row[step_key]`."""
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.board:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != step_key:
                    self.board.add_scalar(f"train/{key}", value, row[step_key])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.board:
            self.board.close()


def _summary_writer(folder: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ModuleNotFoundError("--tensorboard needs the tensorboard package: pip install tensorboard "
                                  "(or dtllama[tensorboard])") from None
    return SummaryWriter(folder)


__all__ = ["MetricsWriter", "PEAK_FLOPS", "active_params", "mean_over", "mfu", "peak_memory_gib", "step_flops"]
