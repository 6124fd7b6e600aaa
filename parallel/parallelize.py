"""`parallelize`: the one function that applies every parallelism, in the order of the design."""

from __future__ import annotations

import warnings

import torch
from torch.distributed.device_mesh import DeviceMesh

from .ac import apply_ac
from .batch_check import apply_batch_check
from .compile import apply_compile
from .cp import apply_cp, cp_batch_check
from .dims import ParallelDims
from .ep import apply_ep, routed_experts, shard_experts
from .float8 import apply_float8
from .fsdp import apply_fsdp
from .mixed_precision import apply_mixed_precision, supports_casts
from .options import CompileOptions, Float8Options, FSDPOptions
from .tp import apply_tp


def parallelize(
    model: torch.nn.Module,
    dims: ParallelDims,
    mesh: DeviceMesh | None = None,
    *,
    ac: str = "none",
    compile: bool | CompileOptions = False,
    fsdp: FSDPOptions | None = None,
    param_dtype: torch.dtype | None = None,
    float8: Float8Options | None = None,
) -> torch.nn.Module:
    """Apply float8 (the decoder linears, through torchao) -> TP/SP -> EP -> Ulysses CP -> activation checkpointing
    -> per-block compile -> FSDP2/HSDP (routed experts first, over `efsdp`; where a model that casts at use has no
    data parallelism, mixed precision by casts instead) -> batch check, in place, to a whole model or to one pipeline stage of it (`pp.pipeline_llm`
    calls it per stage); returns the model.

    `dims` must have built its meshes (`dims.build_mesh()`); `compile=True` means `CompileOptions()`. `mesh` and
    `param_dtype` are deprecated spellings kept for the shared side-by-side benchmark, which calls
    `parallelize(model, dims, mesh, param_dtype=...)`: the mesh must be the one `dims` built, and `param_dtype`
    means `fsdp=FSDPOptions(param_dtype=...)` (a DeprecationWarning says so). `float8`: the decoder layers'
    linears compute in float8 (`Float8Options`; call `float8.after_optimizer_step(model)` after each step). Build the
    model on the meta device, call this, then `to_empty(device=...)` and `init_weights` (or load a checkpoint): no
    rank ever holds the whole model (`init_weights` builds one full parameter at a time on the host and keeps this
    rank's slice). What each parallelism touches, the model says through its protocol (`dtllama.models.protocol`).
    """
    fsdp, compile = _options(dims, mesh, fsdp, param_dtype, compile)
    dims.check_model(model.config, compile=compile is not None, ac=ac, device_type=dims.mesh("world").device_type,
                     cpu_offload=fsdp.cpu_offload)
    if float8 is not None:
        apply_float8(model, float8, dims.mesh("world").device_type)
    if dims.tp_enabled:
        apply_tp(model, dims.mesh("tp"))
    if dims.ep_enabled:
        apply_ep(model, dims.mesh("ep"))
    if dims.cp_enabled:
        apply_cp(model, dims.mesh("cp"))
    apply_ac(model, ac)
    if compile is not None:
        apply_compile(model, compile.backend)
    _shard(model, dims, fsdp)
    # Under pp the pipeline validates each step's batch before its schedule runs (`Pipeline.split`).
    if dims.world_size > 1 and not dims.pp_enabled:
        checks = [cp_batch_check(dims.cp, dims.token_multiple)] if dims.cp_enabled else []
        apply_batch_check(model, dims.mesh("flat"), checks)
    return model


def _shard(model: torch.nn.Module, dims: ParallelDims, fsdp: FSDPOptions) -> None:
    """FSDP2 (routed experts first, over their own mesh), or mixed precision by casts at use.

    FSDP also carries mixed precision, on a single dp rank too, except where a model that casts at use has no data
    parallelism (one rank, TP or pipeline stages alone): there its all-gather and reduce-scatter are copies, and
    casting at each use costs a fifth of them (`mixed_precision.py`). Under EP or TP the routed experts are sharded
    first (the layers' FSDP then leaves them be); under TP even without FSDP elsewhere, since their reduce-scatter
    is what sums the TP ranks' token shards. Otherwise they are dense parameters of their layer's FSDP group."""
    cast_only = (not dims.dp_enabled and fsdp.param_dtype is not None and not fsdp.cpu_offload
                 and supports_casts(model))
    use_fsdp = not cast_only and (dims.dp_enabled or fsdp.param_dtype is not None or fsdp.cpu_offload)
    if cast_only:
        apply_mixed_precision(model, fsdp.param_dtype)
    if routed_experts(model) and ((dims.ep_enabled and use_fsdp) or dims.tp_enabled):
        shard_experts(model, dims.mesh("efsdp"), fsdp, dims.mesh("dp").size())
    if use_fsdp:
        apply_fsdp(model, dims.mesh("fsdp"), fsdp)


def _options(dims, mesh, fsdp, param_dtype, compile) -> tuple[FSDPOptions, CompileOptions | None]:
    """Check the arguments' shapes and turn the short and deprecated forms into option objects."""
    if mesh is not None and mesh is not dims.mesh("world"):
        raise ValueError("parallelize got a mesh that is not the one dims.build_mesh() returned; "
                         "pass the same ParallelDims that built it (or leave mesh out)")
    dims.mesh("world")  # a clear error if build_mesh was not called
    if fsdp is not None and param_dtype is not None:
        raise ValueError(f"param_dtype={param_dtype} given twice; put it in FSDPOptions(param_dtype=...) only")
    if param_dtype is not None or mesh is not None:
        warnings.warn("parallelize(model, dims, mesh, param_dtype=...) is deprecated: leave the mesh out (dims owns "
                      "it) and pass fsdp=FSDPOptions(param_dtype=...)", DeprecationWarning, stacklevel=3)
    fsdp = fsdp if fsdp is not None else FSDPOptions(param_dtype=param_dtype)
    if compile is True:
        compile = CompileOptions()
    elif compile is False:
        compile = None
    elif not isinstance(compile, CompileOptions):
        raise TypeError(f"compile={compile!r} must be a bool or a CompileOptions")
    return fsdp, compile
