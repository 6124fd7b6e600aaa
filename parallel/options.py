"""Options of `parallelize`, grouped per parallelism as small frozen dataclasses (torchtitan's style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FSDPOptions:
    """FSDP2 / HSDP over the `fsdp` mesh; it also carries mixed precision.

    param_dtype: the dtype parameters are all-gathered in and compute runs in (None: keep fp32);
      the sharded fp32 master weights stay what the optimizer steps. On a one-rank world (a dense model, no
      offload) no FSDP is applied: parameters stay fp32 and are cast at each use (`apply_mixed_precision`).
    reduce_dtype: the dtype gradients are reduce-scattered in (fp32 keeps the sum exact for bf16 compute).
    reshard_after_forward: free each layer's gathered parameters after its forward (ZeRO-3); False keeps
      them until backward (ZeRO-2-like: one all-gather per step instead of two, more memory). None: True,
      except on a one-rank mesh (mixed precision alone), where the "all-gather" is a cast and a copy
      that frees only the low-precision copy.
    cpu_offload: keep sharded parameters, gradients and optimizer state in pinned host memory
      (materialize the model on the host, `to_empty(device="cpu")`, and move its buffers to the GPU).
    """

    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = torch.float32
    reshard_after_forward: bool | None = None
    cpu_offload: bool = False


@dataclass(frozen=True)
class CompileOptions:
    """Per-block `torch.compile(fullgraph=True)`; `backend` is any torch.compile backend."""

    backend: str = "inductor"
