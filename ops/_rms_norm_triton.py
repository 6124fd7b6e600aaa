"""Triton kernels of `dtllama::rms_norm` (see `rms_norm.py` for the formula they implement).

Forward: each program normalizes `ROWS` whole rows (the row lives in registers), writing y and rstd.
Backward: a fixed grid of programs (`_WAVES` per SM) walks contiguous row ranges, writes dx per row and
keeps its weight-gradient sum in registers, so dweight is one small `[programs, H]` reduction instead
of a second pass over the rows. Launch sizes are fixed per hidden size (no autotuning: its Python
overhead per call was larger than the kernels' time).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from ._triton import sm_count


_WAVES = 2  # backward programs per SM
_STAGE_BYTES = 160 * 1024  # shared memory the backward's pipelined loads may take (an SM has 227 KiB)


@lru_cache(maxsize=None)
def _launch(H: int) -> tuple[int, int, int, int]:
    """`(BLOCK_H, forward rows per program, backward rows per step, warps)`: about 16K forward and 8K
    backward elements per program step (sizes tuned on an H200)."""
    block = triton.next_power_of_2(H)
    return block, max(1, 16384 // block), max(1, 8192 // block), 16 if block >= 4096 else 8


@triton.jit
def _forward_kernel(X, W, Y, RSTD, n_rows, H, eps, BLOCK_H: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    rmask, cmask = rows < n_rows, cols < H
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * H + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    xhat = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + offs, (w[None, :] * xhat).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _backward_kernel(DY, X, W, RSTD, DX, DW_PART, n_rows, H, programs, BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
                     STAGES: tl.constexpr):
    pid = tl.program_id(0)
    steps = tl.cdiv(n_rows, programs * ROWS)  # this program's rows: steps * ROWS contiguous ones
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for i in tl.range(0, steps, num_stages=STAGES):
        rows = (pid * steps + i) * ROWS + tl.arange(0, ROWS)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * H + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / H
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        acc += tl.sum(dy * xhat.to(X.dtype.element_ty).to(tl.float32), axis=0)
    tl.store(DW_PART + pid.to(tl.int64) * H + cols, acc, mask=cmask)


def _programs(n_rows: int, device: torch.device) -> int:
    sms = sm_count(device.index or 0) if device.type == "cuda" else 4
    return max(1, min(sms * _WAVES, n_rows))


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, H = x.shape
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows:
        block, rows, _, warps = _launch(H)
        _forward_kernel[(triton.cdiv(n_rows, rows),)](x, weight, y, rstd, n_rows, H, eps, BLOCK_H=block, ROWS=rows,
                                                      num_warps=warps)
    return y, rstd


def backward(dy, x, weight, rstd) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, H = x.shape
    dx = torch.empty_like(x)
    if not n_rows:
        return dx, torch.zeros_like(weight)
    programs = _programs(n_rows, x.device)
    part = torch.empty(programs, H, dtype=torch.float32, device=x.device)
    block, _, rows, warps = _launch(H)
    # Software-pipeline the loop up to 3 deep (the next rows load while this one computes), as far as
    # the loaded x and dy tiles fit in shared memory.
    stages = max(1, min(3, _STAGE_BYTES // (rows * block * (x.element_size() + dy.element_size()))))
    _backward_kernel[(programs,)](dy, x, weight, rstd, dx, part, n_rows, H, programs, BLOCK_H=block, ROWS=rows,
                                  STAGES=stages, num_warps=warps)
    return dx, part.sum(0).to(weight.dtype)
