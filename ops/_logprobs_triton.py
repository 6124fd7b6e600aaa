"""Triton kernels of the fused log-probs/entropy (see `logprobs.py` for the math and the torch spec).

`row_stats`: one program per row streams its fp32 logits once, keeping per-lane online max, sum of
exp and (for the entropy) sum of exp * (z - max), merged across lanes at the end. `dlogits`: an elementwise pass over a
`[T, tile]` logits tile (or kept rows) writing the logits gradient in the matmul dtype.
`keep`: a chunk's logits relative to their row max, in the dtype they are kept in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048


@triton.jit
def _row_stats_kernel(Z, Y, M, S, TT, P, V, stride, inv_t, BLOCK: tl.constexpr, ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = Z + row * stride
    lane = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    t = tl.zeros([BLOCK], tl.float32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + lane
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=float("-inf")) * inv_t
        new = tl.maximum(m, z)
        ref = tl.where(new == float("-inf"), 0.0, new)  # lanes that have seen nothing yet
        a = tl.exp(m - ref)
        e = tl.exp(z - ref)
        if ENTROPY:
            t = a * (t + tl.where(s > 0, (m - ref) * s, 0.0)) + tl.where(mask, e * (z - ref), 0.0)
        s = a * s + e
        m = new
    top = tl.max(m, axis=0)
    a = tl.where(s > 0, tl.exp(m - top), 0.0)
    s_row = tl.sum(a * s, axis=0)
    if ENTROPY:
        t_row = tl.sum(a * (t + tl.where(s > 0, (m - top) * s, 0.0)), axis=0)
    else:
        t_row = 0.0
    y = tl.load(Y + row)
    mine = (y >= 0) & (y < V)
    picked = tl.load(base + tl.where(mine, y, 0), mask=mine, other=0.0) * inv_t
    tl.store(M + row, top)
    tl.store(S + row, s_row)
    tl.store(TT + row, t_row)
    tl.store(P + row, tl.where(mine, picked, 0.0))


@triton.jit
def _dlogits_kernel(Z, DZ, Y, SHIFT, ENT, GLP, GENT, V, stride_z, stride_dz, inv_t, scale, BLOCK: tl.constexpr,
                    ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    z = tl.load(Z + row * stride_z + cols, mask=mask, other=0.0).to(tl.float32)
    logp = z * scale - tl.load(SHIFT + row)
    g_lp = tl.load(GLP + row)
    p = tl.exp(logp)
    if ENTROPY:
        dz = -p * (g_lp + tl.load(GENT + row) * (logp + tl.load(ENT + row)))
    else:
        dz = -p * g_lp
    dz = tl.where(cols == tl.load(Y + row), dz + g_lp, dz) * inv_t
    tl.store(DZ + row * stride_dz + cols, dz.to(DZ.dtype.element_ty), mask=mask)


@triton.jit
def _keep_kernel(Z, M, OUT, V, stride_z, stride_out, inv_t, lowest, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    z = tl.load(Z + row * stride_z + cols, mask=mask, other=0.0)
    u = tl.maximum(z * inv_t - tl.load(M + row), lowest)
    tl.store(OUT + row * stride_out + cols, u.to(OUT.dtype.element_ty), mask=mask)


def row_stats(z: torch.Tensor, y: torch.Tensor, inv_t: float, entropy: bool = True):
    rows, V = z.shape
    out = [torch.empty(rows, dtype=torch.float32, device=z.device) for _ in range(4)]
    if rows:
        _row_stats_kernel[(rows,)](z, y.contiguous(), *out, V, z.stride(0), inv_t, BLOCK=_BLOCK, ENTROPY=entropy,
                                   num_warps=8)
    return tuple(out)


def dlogits(z, y, shift, entropy, g_lp, g_ent, inv_t: float, scale: float, out: torch.Tensor) -> None:
    """Into `out` (rows of unit column stride), from `logprob = z * scale - shift`; `g_ent` None: log-probs only
    (`entropy` is not read)."""
    rows, V = z.shape
    if rows and V:
        grid = (rows, triton.cdiv(V, _BLOCK))
        with_entropy = g_ent is not None
        ent, g_ent = (entropy.contiguous(), g_ent.contiguous()) if with_entropy else (shift, shift)
        _dlogits_kernel[grid](z, out, y.contiguous(), shift.contiguous(), ent, g_lp.contiguous(), g_ent, V,
                              z.stride(0), out.stride(0), inv_t, scale, BLOCK=_BLOCK, ENTROPY=with_entropy,
                              num_warps=8)


def keep(z, m, inv_t: float, out: torch.Tensor) -> None:
    rows, V = z.shape
    if rows and V:
        _keep_kernel[(rows, triton.cdiv(V, _BLOCK))](z, m.contiguous(), out, V, z.stride(0), out.stride(0), inv_t,
                                                     torch.finfo(out.dtype).min, BLOCK=_BLOCK, num_warps=8)
