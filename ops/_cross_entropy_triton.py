"""Triton kernel of the fused cross-entropy's logits gradient (see `cross_entropy.py` for the math and the torch
spec): an elementwise pass over a chunk's logits that overwrites them with their gradient."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048


@triton.jit
def _grad_kernel(Z, Y, LSE, A, B, C, V, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    ptr = Z + row * stride + cols
    z = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(A + row) * tl.exp(z - tl.load(LSE + row)) - tl.load(C + row)
    g = tl.where(cols == tl.load(Y + row), g - tl.load(B + row), g)
    tl.store(ptr, g.to(Z.dtype.element_ty), mask=mask)


def grad_in_place(z: torch.Tensor, y, lse, a, b, c) -> None:
    rows, V = z.shape
    if rows and V:
        grid = (rows, triton.cdiv(V, _BLOCK))
        _grad_kernel[grid](z, y.contiguous(), lse.contiguous(), a.contiguous(), b.contiguous(), c.contiguous(), V,
                           z.stride(0), BLOCK=_BLOCK, num_warps=8)
