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


@dataclass(frozen=True)
class Float8Options:
    """float8 training of the decoder layers' linears through torchao (`dtllama.parallel.float8`).

    recipe: "tensorwise" (one dynamic scale per tensor: the fastest, float8 all-gathers) or "rowwise" (a scale
      per row: closer to bf16, weights all-gathered in the parameter dtype).
    fsdp_all_gather: FSDP2 all-gathers the weights in float8 (half the bytes of bf16); tensor-wise only. None:
      on for tensor-wise scales, off for row-wise.
    precompute_scales: with float8 all-gathers, the weights' scales for the next step in one all-reduce after
      each optimizer step (`float8.after_optimizer_step`) instead of one per weight in forward.
    """

    recipe: str = "tensorwise"
    fsdp_all_gather: bool | None = None
    precompute_scales: bool = True

    @property
    def float8_all_gather(self) -> bool:
        return self.recipe == "tensorwise" if self.fsdp_all_gather is None else self.fsdp_all_gather
