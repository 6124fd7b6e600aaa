"""FlashAttention-4 (the CuTe DSL build of FlashAttention, pip package `flash-attn-4`) as custom ops.

Packed causal attention with native grouped-query heads, the fastest backend on Hopper (figures in the
README). Its Python entry points launch JIT-compiled CuTe kernels that dynamo cannot trace, so forward
and backward enter as `torch.library` custom ops (fake shapes + autograd): compiled blocks keep them as
single nodes and selective activation checkpointing can name the forward. The calls go to FA4's
`_flash_attn_fwd` / `_flash_attn_bwd`, the functions its own autograd.Function wraps (custom ops run
without autograd, so the public wrapper could not provide the backward).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd
except Exception:  # noqa: BLE001 - not installed, or built for another CUDA: the dispatch falls back
    _flash_attn_fwd = _flash_attn_bwd = None

AVAILABLE = _flash_attn_fwd is not None


@torch.library.custom_op("dtllama::fa4_varlen_fwd", mutates_args=(), device_types="cuda")
def fa4_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> tuple[Tensor, Tensor]:
    """Causal attention of packed `q[T, Hq, D]` over `k, v[T, Hkv, D]`: `(out [T, Hq, D], lse [Hq, T] fp32)`."""
    out, lse, *_ = _flash_attn_fwd(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                                   max_seqlen_k=max_seqlen, causal=True, return_lse=True)
    return out, lse


@fa4_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen):
    return q.new_empty((*q.shape[:2], v.shape[-1])), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("dtllama::fa4_varlen_bwd", mutates_args=(), device_types="cuda")
def fa4_varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
                   max_seqlen: int) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, causal=True, cu_seqlens_q=cu_seqlens,
                                 cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)[:3]
    return dq, dk, dv


@fa4_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen = max_seqlen


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = fa4_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen)
    return dq, dk, dv, None, None


fa4_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


def fa4_varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    return fa4_varlen_fwd(q, k, v, cu_seqlens.to(torch.int32), max_seqlen)[0]
