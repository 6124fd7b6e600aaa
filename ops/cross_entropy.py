"""The SFT / pretraining loss straight from hidden states, its gradients made in the forward pass.

A scalar loss knows its upstream gradient up to one scale, so each token chunk's logits are computed once, turned
into their gradient in place and consumed at once by the two gradient matmuls: three `T x V x H` matmuls in all
and one `chunk x V` buffer in the activations' dtype (the log-prob op, whose upstream gradients come later, keeps
rows or recomputes them). Backward only scales the saved gradients. This is Liger-Kernel's fused linear
cross-entropy on dtllama's kernels, vocab-parallel under TP (row statistics merged over the group) and on token
shards under SP / CP (a normalizer shared by every rank).

Per token whose label is not -100, with `lse` over the whole vocabulary of size V, smoothing `eps`, z-loss `zl`:
    loss = lse - (1 - eps) z_y - eps mean(z) + zl lse^2
    d loss / dz = (1 + 2 zl lse) softmax(z) - (1 - eps) onehot(y) - eps / V
summed over tokens and divided by the normalizer (the number of labelled tokens by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from ._triton import use_triton
from .logprobs import _all_reduce, _all_tokens, _merge, _mm_f32, _row_stats, _vocab_shard
from .rmpad import IGNORE_INDEX, check_labels


@dataclass(frozen=True)
class CrossEntropy:
    """What `linear_cross_entropy` and the causal LM's `loss=` compute: the sum over labelled tokens divided by
    `normalizer` (None: their number in this call; pass the global count when tokens are spread over ranks or
    micro-batches), plus `z_loss * lse^2` per token (PaLM's z-loss) and `label_smoothing` toward uniform."""

    normalizer: float | Tensor | None = None
    z_loss: float = 0.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        if isinstance(self.normalizer, (int, float)) and not self.normalizer > 0:
            raise ValueError(f"normalizer={self.normalizer} must be positive (the number of loss tokens), or None")
        if self.z_loss < 0:
            raise ValueError(f"z_loss={self.z_loss} must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")


def default_chunk(T: int, V: int, H: int) -> int:
    """Tokens per chunk: a power of two whose `chunk x V` buffer is about twice the `T x H` hidden states (Liger's
    rule takes once: on one H200 at T=16384, V=128256, H=4096 twice is 9% faster for 0.12 GiB more, the chunk
    matmuls being that much fuller; see the README's op figures)."""
    return min(max(T, 1), 2 ** math.ceil(math.log2(max(1, math.ceil(2 * T / math.ceil(V / H))))))


def _grad_in_place(z: Tensor, y: Tensor, lse: Tensor, a: Tensor, b: Tensor, c: Tensor) -> None:
    """`z <- a exp(z - lse) - b onehot(y) - c` per row (fp32 math, stored in z's dtype); `y` outside `[0, V)`
    marks no label column in this shard."""
    if use_triton(z):
        from ._cross_entropy_triton import grad_in_place

        return grad_in_place(z, y, lse, a, b, c)
    g = a[:, None] * (z.float() - lse[:, None]).exp() - c[:, None]
    V = z.shape[1]
    mine = (y >= 0) & (y < V)
    if V:
        g.scatter_add_(1, y.clamp(0, V - 1)[:, None].long(), -(b * mine)[:, None])
    z.copy_(g)


def _chunk_logits(h: Tensor, weight: Tensor, out: Tensor | None) -> Tensor:
    """A chunk's logits: into the reused buffer in the activations' dtype (CUDA kernels read it), else fp32."""
    if out is None:
        return _mm_f32(h, weight.t())
    out = out[: h.shape[0]]
    torch.mm(h, weight.t(), out=out)
    return out


def _fused_forward(hidden, weight, labels, scale, z_loss, smoothing, chunk_size, group=None, start=0, vocab=None):
    """`(loss, d_hidden, d_weight)`: the loss times `scale` (a 0-d fp32 tensor) and its gradients, by token chunks.
    With a `group`, `weight` holds vocab rows `[start, start + V)` of the group's `vocab`; statistics are merged over
    the group and d_hidden summed over it. The weight gradient is accumulated in place in the weight's dtype (one
    rounding per chunk, as Liger's: an fp32 accumulator would cost a second copy of the head's size)."""
    T, V = hidden.shape[0], weight.shape[0]
    vocab = V if vocab is None else vocab
    d_hidden = torch.empty_like(hidden)
    d_weight = torch.empty_like(weight)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    buf = hidden.new_empty((min(chunk_size, T), V)) if use_triton(hidden) else None
    scale = scale.float()
    if T == 0:
        d_weight.zero_()
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        z = _chunk_logits(hidden[s:e], weight, buf)
        y = labels[s:e] - start
        m, se, _, picked = _merge(*_row_stats(z, y, 1.0, entropy=False), group)
        lse = m + se.log()
        valid = (labels[s:e] != IGNORE_INDEX).float()
        row = lse - (1 - smoothing) * picked + z_loss * lse * lse
        if smoothing:
            zsum = z.sum(-1, dtype=torch.float32)
            _all_reduce(zsum, group)
            row = row - smoothing * zsum / vocab
        total += (row * valid).sum() * scale
        w = valid * scale
        _grad_in_place(z, y, lse, w * (1 + 2 * z_loss * lse), w * (1 - smoothing), w * (smoothing / vocab))
        dz = z.to(hidden.dtype)  # a no-op for the buffer; fp32 logits of low-precision inputs are cast
        if d_hidden.dtype == dz.dtype:
            torch.mm(dz, weight, out=d_hidden[s:e])
        else:
            d_hidden[s:e] = dz @ weight
        if s == 0:
            torch.mm(dz.t(), hidden[s:e], out=d_weight)
        else:
            d_weight.addmm_(dz.t(), hidden[s:e])
    _all_reduce(d_hidden, group)
    return total, d_hidden, d_weight


@torch.library.custom_op("dtllama::linear_cross_entropy", mutates_args=())
def _forward(hidden: Tensor, weight: Tensor, labels: Tensor, scale: Tensor, z_loss: float, smoothing: float,
             chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    return _fused_forward(hidden, weight, labels, scale, z_loss, smoothing, chunk_size)


@_forward.register_fake
def _(hidden, weight, labels, scale, z_loss, smoothing, chunk_size):
    return hidden.new_empty((), dtype=torch.float32), torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    # Outputs saved for backward (not marked non-differentiable, which keeps a reference on ctx). On the GPU autograd
    # still copies them into `.grad` (2.21 GiB peak at hidden 4096 against 1.35 through `_FusedCrossEntropy`), so
    # eager plain tensors take the autograd.Function; this op serves compile and token-sharded DTensors.
    ctx.save_for_backward(output[1], output[2])


def _scaled(grads: tuple[Tensor, Tensor], g: Tensor) -> tuple[Tensor, Tensor]:
    """The saved gradients times the upstream scalar `g`, in place: they are this call's own, used once (a second
    backward through the same graph is refused by autograd's version check of saved tensors)."""
    d_hidden, d_weight = grads
    return d_hidden.mul_(g.to(d_hidden.dtype)), d_weight.mul_(g.to(d_weight.dtype))


def _backward(ctx, grad_loss, _g_hidden, _g_weight):
    return (*_scaled(ctx.saved_tensors, grad_loss), None, None, None, None, None)


_forward.register_autograd(_backward, setup_context=_setup_context)


# Sequence / data parallel: tokens are independent rows, so token shards of hidden and labels give a partial loss
# and a partial weight gradient; the scale (the normalizer's inverse) is the same on every rank.
@register_sharding(torch.ops.dtllama.linear_cross_entropy.default)
def _(hidden, weight, labels, scale, z_loss, smoothing, chunk_size):
    return [([Partial(), Shard(0), Partial()], [Shard(0), Replicate(), Shard(0), Replicate(), None, None, None]),
            ([Replicate()] * 3, [Replicate()] * 4 + [None, None, None])]


class _FusedCrossEntropy(torch.autograd.Function):
    """The fused computation in eager mode: on plain tensors, or on a vocab-sharded head (tensor parallel: every rank
    holds all tokens, its vocab slice's logits, and the merged statistics; a process group cannot be a custom-op
    argument). The gradients live on ctx, not as outputs, so backward hands autograd the only reference and the
    parameters' `.grad` take them without a copy (the custom op serves compile and token-sharded DTensors)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, z_loss, smoothing, chunk_size, group, start, vocab):
        loss, d_hidden, d_weight = _fused_forward(hidden, weight, labels, scale, z_loss, smoothing, chunk_size, group,
                                                  start, vocab)
        ctx.grads = d_hidden, d_weight
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("linear_cross_entropy's backward ran twice: its gradients are made in forward and "
                               "used once; compute the loss again for a second backward")
        return (*_scaled(grads, grad_loss), None, None, None, None, None, None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, loss: CrossEntropy | None = None,
                         chunk_size: int | None = None, check: bool = True) -> Tensor:
    """The mean (or `loss.normalizer`-divided sum) next-token cross-entropy of `labels` under
    `softmax(hidden @ weight.T)`, with `loss`'s z-loss and label smoothing: a 0-d fp32 tensor whose backward is one
    scale of gradients made in forward. Never `[T, vocab]` logits: `chunk_size` tokens at a time (None: a buffer about
    twice the size of `hidden`, `default_chunk`). A vocab-sharded weight DTensor (TP) merges statistics over its mesh; token-sharded DTensor
    inputs (SP) give each rank's share. `check=False` skips validating the labels (one device sync)."""
    loss = loss or CrossEntropy()
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [T, H] and [V, H]")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be [T]={hidden.shape[0]}")
    chunk = default_chunk(hidden.shape[0], weight.shape[0], hidden.shape[1]) if chunk_size is None else chunk_size
    if chunk < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    if check and not torch.compiler.is_compiling():
        check_labels(labels, weight.shape[0])
    local_labels = labels.full_tensor() if isinstance(labels, DTensor) else labels
    if loss.normalizer is None:
        scale = 1.0 / (local_labels != IGNORE_INDEX).sum().clamp_min(1).float()
    elif isinstance(loss.normalizer, Tensor):  # e.g. a global token count all-reduced on the device
        scale = 1.0 / loss.normalizer.detach().to(hidden.device, torch.float32).reshape(())
    else:
        scale = torch.full((), 1.0 / loss.normalizer, dtype=torch.float32, device=hidden.device)
    if isinstance(weight, DTensor) and any(p == Shard(0) for p in weight.placements):
        local_w, group, start = _vocab_shard(weight)
        h = _all_tokens(hidden, weight.device_mesh)
        return _FusedCrossEntropy.apply(h, local_w, local_labels, scale, float(loss.z_loss),
                                        float(loss.label_smoothing), int(chunk), group, start, weight.shape[0])
    if not isinstance(hidden, DTensor) and not torch.compiler.is_compiling():
        return _FusedCrossEntropy.apply(hidden.contiguous(), weight, labels, scale, float(loss.z_loss),
                                        float(loss.label_smoothing), int(chunk), None, 0, weight.shape[0])
    if isinstance(hidden, DTensor):
        from .logprobs import _like_tokens

        labels = _like_tokens(local_labels, hidden)
        mesh = hidden.device_mesh
        scale = DTensor.from_local(scale, mesh, [Replicate()] * mesh.ndim, run_check=False)
    out, _, _ = _forward(hidden.contiguous(), weight, labels, scale, float(loss.z_loss), float(loss.label_smoothing),
                         int(chunk))
    return out


__all__ = ["CrossEntropy", "default_chunk", "linear_cross_entropy"]
