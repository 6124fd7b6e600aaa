"""Torch-version shims: every place where dtllama's code depends on which torch is installed.

Each shim names the torch versions that differ and how, so that raising the minimum torch means deleting
code here rather than hunting for probes. Layer 0: imports only torch and the standard library.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch


def torch_version() -> tuple[int, int]:
    """`(major, minor)` of the installed torch (`"2.13.0+cpu"` -> `(2, 13)`), for version gates."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _varlen_attn_params() -> frozenset[str] | None:
    """The parameter names of `torch.nn.attention.varlen.varlen_attn`, or None when this torch has none.

    Torch < 2.10 has no `varlen_attn`; 2.10 takes `is_causal`; 2.11 takes `window_size` instead and has no
    `enable_gqa`; 2.13 takes `window_size` and `enable_gqa`.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


# Probed once at import, so that compiled code reads a constant instead of tracing an import.
VARLEN_ATTN_PARAMS = _varlen_attn_params()


def causal_varlen_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                       params: frozenset[str] | None = VARLEN_ATTN_PARAMS, scale: float | None = None,
                       window: int | None = None) -> torch.Tensor:
    """Causal `varlen_attn` of packed `q[T, Hq, D]` over grouped-query `k, v[T, Hkv, D]`, on any torch that has it.

    Torch 2.10 spells causal `is_causal=True`, 2.11 and later `window_size=(-1, 0)`; 2.13 takes grouped KV
    (`enable_gqa`), 2.11 does not, so there KV heads are repeated. `params`: `varlen_attn`'s parameter names.
    """
    from torch.nn.attention.varlen import varlen_attn

    cu, gqa = cu_seqlens.to(torch.int32), k.shape[1] != q.shape[1]
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if window is None else (window - 1, 0)
    else:
        kwargs["is_causal"] = True
    if scale is not None:
        kwargs["scale"] = scale
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = gqa
    elif gqa:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


@lru_cache(maxsize=None)
def has_mm_out_dtype() -> bool:
    """Whether `torch.mm(a, b, out_dtype=torch.float32)` runs for bf16 `a, b` on the current GPU.

    Older torch has no `out_dtype` argument (TypeError); a build whose `aten::mm.dtype` has no kernel for this
    GPU raises a RuntimeError. Needs a CUDA device; the answer is cached per process.
    """
    a = torch.ones(1, 1, dtype=torch.bfloat16, device="cuda")
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def local_shape_and_offset(t) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`(shape, global offset)` of this rank's slice of the DTensor `t`: which rows/columns of the full tensor it
    holds.

    DTensor's helper for it is private: `torch.distributed.tensor._utils.compute_local_shape_and_global_offset`
    in torch 2.11-2.13 (it moved before, from `torch.distributed._tensor`); this is the one place calling it.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)


__all__ = ["VARLEN_ATTN_PARAMS", "causal_varlen_attn", "has_mm_out_dtype", "local_shape_and_offset", "torch_version"]
