"""Weights to a rollout engine: a parallelized model's weights as full tensors under Hugging Face checkpoint names,
in buckets of at most `bucket_bytes`, from any layout.

An RL trainer samples with an inference engine (vLLM, SGLang) and trains with dtllama; after each update the engine
needs the new weights. `stream_weights` yields them bucket by bucket, each a list of `(name, tensor)` that the
engine's `load_weights(iterable)` takes as they are (HF checkpoint names and shapes: Qwen3-MoE's experts one tensor
per expert, as published files hold them; engines that fuse q/k/v or gate/up do so on their side):

    for bucket in stream_weights(model, dims, bucket_bytes=2**30, dtype=torch.bfloat16):
        engine_model.load_weights(bucket)   # e.g. vLLM: llm.llm_engine.model_executor.driver_worker...load_weights

Every rank runs the loop (the gathers are collectives); each bucket is gathered from the ranks that hold it:
- FSDP / HSDP, TP, CP, EP: `DTensor.full_tensor()` of each parameter over its own mesh (routed experts over
  `efsdp x ep`), within the ranks of one pipeline stage;
- PP: every rank learns which stage holds which tensor (an all-gather of the names over `pp`), buckets are cut
  from that one global order, and each tensor is broadcast over `pp` from its stage (a tied embedding's copy on the
  last stage is sent once, as the HF checkpoint holds it once).
`to="all"` hands every bucket to every rank; `to="first"` only to the first rank of each `dp` group (local rank
0 of the `dp` mesh, where an engine colocated per node reads), the others get empty buckets. No rank holds more than
one bucket of full tensors (beyond its own shards) at a time: the generator drops its references before gathering
the next, so a consumer that lets go of a bucket bounds memory by it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dtllama.models.blocks import hf_name
from dtllama.models.hf_io import hf_state
from dtllama.models.moe import GroupedExperts
from dtllama.parallel import ParallelDims

DESTINATIONS = ("all", "first")


class _Entry(NamedTuple):
    """One state-dict tensor of the whole model: its HF name, shape, dtype, and the pipeline rank holding it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    owner: int


def _global_order(local: dict[str, torch.Tensor], dims: ParallelDims | None, dtype) -> list[_Entry]:
    """Every tensor of the whole model once, in stage order then state-dict order, the same list on every rank."""
    mine = [(n, tuple(t.shape), dtype or t.dtype) for n, t in local.items()]
    if dims is None or dims.pp == 1:
        return [_Entry(n, s, d, 0) for n, s, d in mine]
    pp = dims.mesh("pp")
    stages: list = [None] * pp.size()
    dist.all_gather_object(stages, mine, group=pp.get_group())
    seen, order = set(), []
    for owner, entries in enumerate(stages):
        for n, s, d in entries:
            if n not in seen:  # the last stage's copy of a tied embedding: sent once, from the first stage
                seen.add(n)
                order.append(_Entry(n, s, d, owner))
    return order


def _buckets(order: list[_Entry], bucket_bytes: int) -> list[list[_Entry]]:
    """Consecutive entries filling buckets up to `bucket_bytes` (a tensor larger than that goes alone)."""
    out, current, used = [], [], 0
    for e in order:
        nbytes = e.dtype.itemsize * torch.Size(e.shape).numel()
        if current and used + nbytes > bucket_bytes:
            out.append(current)
            current, used = [], 0
        current.append(e)
        used += nbytes
    return out + ([current] if current else [])


def _full(t: torch.Tensor, dtype) -> torch.Tensor:
    """The full tensor, cast; a DTensor whole on this rank (replicated, or on a mesh of one rank) without the
    redistribution's dispatch (most of the time of a small tensor)."""
    if isinstance(t, DTensor):
        whole = t.device_mesh.size() == 1 or all(p.is_replicate() for p in t.placements)
        full = t.to_local().detach() if whole else t.full_tensor()
    else:
        full = t.detach()
    return full.to(dtype) if dtype is not None and full.dtype != dtype else full


def _gather(bucket: list[_Entry], local: dict, dims: ParallelDims | None, device) -> list[torch.Tensor]:
    """The bucket's full tensors on this rank: gathered over their own meshes in their stage, broadcast over pp."""
    pp_rank = 0 if dims is None or dims.pp == 1 else dims.mesh("pp").get_local_rank()
    out = []
    for e in bucket:
        if e.owner == pp_rank:
            out.append(_full(local[e.name], e.dtype))
        else:
            out.append(torch.empty(e.shape, dtype=e.dtype, device=device))
    if dims is not None and dims.pp > 1:
        pp = dims.mesh("pp")
        for e, t in zip(bucket, out):
            dist.broadcast(t, group=pp.get_group(), group_src=e.owner)
    return out


def _hf_tensors(name: str, tensor: torch.Tensor, experts: dict[str, GroupedExperts]) -> list[tuple[str, torch.Tensor]]:
    """`(name, tensor)` as the HF checkpoint holds it: stacked experts a family stores one per expert split into
    views (`GroupedExperts.per_expert`), everything else as is."""
    prefix, _, leaf = name.rpartition(".")
    module = experts.get(prefix)
    if module is None or not module.per_expert_files:
        return [(name, tensor)]
    return module.per_expert(prefix + ".", leaf, tensor)


def stream_weights(model: torch.nn.Module, dims: ParallelDims | None = None, *, bucket_bytes: int = 2**30,
                   dtype: torch.dtype | None = None, to: str = "all") -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield the model's weights as buckets of `(HF name, full tensor)` (see the module docstring). `model`: the
    parallelized model, or under pipeline parallelism this rank's part (`Pipeline.model`); `dims`: its layout
    (None for a model on one process); `dtype`: cast to it (None: the parameters' own); `to`: "all" or "first"."""
    if to not in DESTINATIONS:
        raise ValueError(f"to={to!r} is not a destination; choose one of {list(DESTINATIONS)}")
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be positive")
    local = hf_state(model)  # this rank's tensors of the HF checkpoint (shards, stacked experts)
    device = next(iter(local.values())).device
    experts = {hf_name(n): m for n, m in model.named_modules() if isinstance(m, GroupedExperts)}
    here = to == "all" or dims is None or dims.mesh("dp").get_local_rank() == 0
    for bucket in _buckets(_global_order(local, dims, dtype), bucket_bytes):
        tensors = _gather(bucket, local, dims, device)
        yield [pair for e, t in zip(bucket, tensors) for pair in _hf_tensors(e.name, t, experts)] if here else []
        del tensors


__all__ = ["DESTINATIONS", "stream_weights"]
