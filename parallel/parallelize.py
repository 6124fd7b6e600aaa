"""`parallelize`: the one function that applies every parallelism, in the order of the design."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from .ac import apply_ac
from .compile import apply_compile
from .dims import ParallelDims
from .fsdp import apply_fsdp
from .tp import apply_tp


def parallelize(
    model: torch.nn.Module,
    dims: ParallelDims,
    mesh: DeviceMesh,
    *,
    ac: str = "none",
    compile: bool = False,
    compile_backend: str = "inductor",
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> torch.nn.Module:
    """Apply TP/SP -> activation checkpointing -> per-block compile -> FSDP2/HSDP, in place.

    Build the model on the meta device, call this, then `to_empty(device=...)` and `init_weights`
    (or load a checkpoint): no rank ever holds the whole model (`init_weights` builds one full
    parameter at a time on the host and keeps this rank's slice).
    """
    dims.check_model(model.config)
    if dims.pp > 1 or dims.cp > 1:
        raise ValueError(f"pp={dims.pp}, cp={dims.cp}: pipeline and context parallelism are not available yet; use 1")
    if compile and dims.tp > 1:
        # AOTAutograd's backward of the sequence-parallel blocks hands DTensor's redistribute a plain
        # tensor in torch 2.13 ("'Tensor' object has no attribute '_local_tensor'"): refuse up front.
        raise ValueError(f"compile=True with tp={dims.tp} is not supported yet; use compile with tp=1, or tp without compile")
    if dims.tp > 1:
        apply_tp(model, mesh["tp"])
    apply_ac(model, ac)
    if compile:
        apply_compile(model, compile_backend)
    # FSDP also carries mixed precision: with a param dtype it is applied even on a single dp rank.
    if dims.dp_replicate * dims.dp_shard * dims.cp > 1 or param_dtype is not None:
        fsdp_mesh = mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else mesh["dp_shard_cp"]
        apply_fsdp(model, fsdp_mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                   reshard_after_forward=reshard_after_forward, cpu_offload=cpu_offload)
    return model
