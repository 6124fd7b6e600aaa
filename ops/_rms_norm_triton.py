"""Triton kernels of `dtllama::rms_norm` (see `rms_norm.py` for the formula they implement).

Forward: each program normalizes `ROWS` whole rows (the row lives in registers), writing y and rstd.
Backward: a fixed grid of programs (`_WAVES` per SM) walks contiguous row ranges, writes dx per row and
keeps its weight-gradient sum in registers, so dweight is one small `[programs, H]` reduction instead
of a second pass over the rows. Both are autotuned per hidden size; every write is idempotent, so
autotuning may rerun them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import sm_count


def _prune(configs, named_args, **kwargs):
    block = triton.next_power_of_2(named_args["H"])
    kept = [c for c in configs if c.kwargs["ROWS"] * block <= 32768]
    return kept or configs[:1]


_FWD_CONFIGS = [triton.Config({"ROWS": r}, num_warps=w) for r in (1, 2, 4, 8) for w in (4, 8, 16)]
_BWD_CONFIGS = _FWD_CONFIGS
_WAVES = 4  # backward programs per SM


@triton.autotune(_FWD_CONFIGS, key=["H"], prune_configs_by={"early_config_prune": _prune})
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


@triton.autotune(_BWD_CONFIGS, key=["H"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _backward_kernel(DY, X, W, RSTD, DX, DW_PART, n_rows, H, programs, BLOCK_H: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    steps = tl.cdiv(n_rows, programs * ROWS)  # this program's rows: steps * ROWS contiguous ones
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for i in range(0, steps):
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
        grid = lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),)  # noqa: E731
        _forward_kernel[grid](x, weight, y, rstd, n_rows, H, eps, BLOCK_H=triton.next_power_of_2(H))
    return y, rstd


def backward(dy, x, weight, rstd) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, H = x.shape
    dx = torch.empty_like(x)
    if not n_rows:
        return dx, torch.zeros_like(weight)
    programs = _programs(n_rows, x.device)
    part = torch.empty(programs, H, dtype=torch.float32, device=x.device)
    _backward_kernel[(programs,)](dy, x, weight, rstd, dx, part, n_rows, H, programs,
                                  BLOCK_H=triton.next_power_of_2(H))
    return dx, part.sum(0).to(weight.dtype)
