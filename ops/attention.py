"""One dispatch for causal attention over a packed batch (`cu_seqlens` marks the documents).

Backends, best first: `flex` (FlexAttention with a document mask; CUDA) and `sdpa` (block-diagonal
causal mask for SDPA: O(T^2) memory, the CPU reference and the spec every other backend is tested
against). `set_attention_backend` or the `DTLLAMA_ATTENTION` environment variable pick one;
`auto` takes the best one available for the device of the inputs.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("auto", "flex", "sdpa")
_backend = os.environ.get("DTLLAMA_ATTENTION", "auto")


def set_attention_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {list(BACKENDS)}")
    _backend = name
    _announce.cache_clear()


def attention_backend(device: torch.device) -> str:
    if _backend not in BACKENDS:
        raise ValueError(f"DTLLAMA_ATTENTION={_backend!r} is unknown; choose one of {list(BACKENDS)}")
    if _backend != "auto":
        return _backend
    return "flex" if device.type == "cuda" else "sdpa"


@lru_cache(maxsize=None)
def _announce(name: str) -> None:
    log.info("dtllama attention backend: %s", name)


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """The index of the sequence each packed token belongs to."""
    return torch.searchsorted(cu_seqlens[1:].long(), torch.arange(total, device=cu_seqlens.device), right=True)


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    causal: bool = True,
) -> torch.Tensor:
    """Attention of packed `q[T, Hq, D]` over `k, v[T, Hkv, D]` within each sequence; returns `[T, Hq, D]`.

    `Hq` must be a multiple of `Hkv` (grouped-query attention; KV is not repeated in memory).
    """
    name = attention_backend(q.device)
    if not torch.compiler.is_compiling():
        _announce(name)
    fn = _flex if name == "flex" else _sdpa
    return fn(q, k, v, cu_seqlens, causal)


def _sdpa(q, k, v, cu_seqlens, causal):
    T = q.shape[0]
    doc = document_ids(cu_seqlens, T)
    mask = doc[:, None] == doc[None, :]
    if causal:
        idx = torch.arange(T, device=q.device)
        mask = mask & (idx[:, None] >= idx[None, :])
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    return out.squeeze(0).transpose(0, 1)


_block_mask_cache: list = [None, None]  # [(cu_seqlens tensor, T, causal), BlockMask]


def _document_block_mask(cu_seqlens, T: int, causal: bool, device):
    """The BlockMask of a batch, built once and reused by every layer that gets the same `cu_seqlens`."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = _block_mask_cache[0]
    if key is not None and key[0] is cu_seqlens and key[1:] == (T, causal):
        return _block_mask_cache[1]
    doc = document_ids(cu_seqlens, T)

    def mask_mod(b, h, q_idx, kv_idx):
        same = doc[q_idx] == doc[kv_idx]
        return same & (q_idx >= kv_idx) if causal else same

    mask = create_block_mask(mask_mod, None, None, T, T, device=device)
    _block_mask_cache[:] = [(cu_seqlens, T, causal), mask]
    return mask


def _flex(q, k, v, cu_seqlens, causal):
    T = q.shape[0]
    block_mask = _document_block_mask(cu_seqlens, T, causal, q.device)
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])
    return out.squeeze(0).transpose(0, 1)


@lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Eager FlexAttention materializes the scores; compiled it is a fused kernel.
    return torch.compile(flex_attention, dynamic=True)
