"""RMSNorm as the custom op `dtllama::rms_norm`: Hugging Face's formula is the spec, Triton runs it on CUDA.

Spec (HF): `y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`, normalized in fp32. The op returns
`y` and the per-row `rstd` the backward reuses; `dtllama::rms_norm_backward` gives `dx` and `dweight`.
The CUDA kernels (`ops/_rms_norm_triton.py`) read x once and write y once forward, read x and dy once
and write dx once backward, and reduce the weight gradient from per-program partial sums (no second
pass over the rows). DTensor inputs (sequence parallel hands the norm `Shard(0)` tokens and a
replicated weight) go through the registered sharding strategies, not through unwrapping.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from ._triton import use_triton


def _out_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype)


@torch.library.custom_op("dtllama::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    if use_triton(x):
        from ._rms_norm_triton import forward

        return forward(x, weight, eps)
    h = x.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1) + eps)
    return weight * (h * rstd[:, None]).to(x.dtype), rstd


@_rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight)), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("dtllama::rms_norm_backward", mutates_args=())
def _rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    if use_triton(x):
        from ._rms_norm_triton import backward

        return backward(dy, x, weight, rstd)
    xhat = x.float() * rstd[:, None]
    g = dy.float() * weight.float()
    dx = (g - xhat * (g * xhat).mean(-1, keepdim=True)) * rstd[:, None]
    dw = (dy.float() * xhat.to(x.dtype).float()).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


@_rms_norm_backward.register_fake
def _(dy, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_backward(dy.contiguous(), x, weight, rstd)
    return dx, dw, None


_rms_norm.register_autograd(_backward, setup_context=_setup_context)


# Rows are independent: tokens may be sharded, the hidden dim may not; the weight gradient of sharded
# rows is a partial sum.
@register_sharding(torch.ops.dtllama.rms_norm.default)
def _(x, weight, eps):
    return [([Shard(0), Shard(0)], [Shard(0), Replicate(), None]),
            ([Replicate(), Replicate()], [Replicate(), Replicate(), None])]


@register_sharding(torch.ops.dtllama.rms_norm_backward.default)
def _(dy, x, weight, rstd):
    return [([Shard(0), Partial()], [Shard(0), Shard(0), Replicate(), Shard(0)]),
            ([Replicate(), Replicate()], [Replicate()] * 4)]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim of `x` (any leading dims; DTensors must be 2-D `[T, hidden]`)."""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} features but the norm weight has {weight.shape[0]}")
    if x.dim() == 2:  # the model's packed tokens, also as DTensors: no reshape to dispatch
        return _rms_norm(x.contiguous(), weight, float(eps))[0]
    return _rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), weight, float(eps))[0].view(x.shape)
