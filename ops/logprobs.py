"""Per-token log-probs and entropy straight from hidden states, chunk by chunk over tokens.

`linear_logprobs_entropy(hidden[T, H], weight[V, H], labels[T])` never holds more than
`chunk_size x V` logits: the forward keeps only `[T]` results, and the backward recomputes each
chunk's logits. This CPU/any-device implementation is the spec for the fused GPU kernel.

Math per row, with z = hidden @ weight.T / temperature and p = softmax(z):
  logprob = log p[label],               entropy H = -sum(p * log p)
  d logprob / dz = onehot(label) - p,   d H / dz = -p * (log p + H)
(the forward forms log p as (z - max) - log sum exp(z - max), as log_softmax does, so large logits do
not cancel; the backward recomputes z and subtracts the saved logsumexp).
Rows whose label is -100 give 0 for both and receive no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rmpad import IGNORE_INDEX


def _all_reduce(x: Tensor, group, op=None) -> None:
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)


def _chunked_forward(hidden, weight, labels, temperature, chunk_size, group=None, start=0):
    """`(logprobs, entropy, logsumexp)` over token chunks. With a `group`, `weight` holds the vocab rows
    `[start, start + V)` of a vocab-sharded head and max, sum-exp, picked log-prob and entropy are
    all-reduced over it; without, it is the whole vocabulary."""
    import torch.distributed as dist

    T, V = hidden.shape[0], weight.shape[0]
    lse = hidden.new_zeros(T, dtype=torch.float32)
    logprobs, entropy = torch.zeros_like(lse), torch.zeros_like(lse)
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        z = (hidden[s:e] @ weight.t()).float() / temperature
        m = z.amax(-1) if V else z.new_full((e - s,), float("-inf"))
        _all_reduce(m, group, dist.ReduceOp.MAX)
        se = torch.exp(z - m[:, None]).sum(-1)
        _all_reduce(se, group)
        logp = (z - m[:, None]) - se.log()[:, None]  # as log_softmax rounds: no large z - lse cancellation
        lse[s:e] = m + se.log()
        y = labels[s:e].long() - start
        mine = (y >= 0) & (y < V)
        picked = logp.gather(1, y.clamp(0, max(V - 1, 0))[:, None]).squeeze(1) if V else logp.new_zeros(e - s)
        both = torch.stack([torch.where(mine, picked, 0.0), -(logp.exp() * logp).sum(-1)])
        _all_reduce(both, group)
        valid = labels[s:e] != IGNORE_INDEX
        logprobs[s:e] = torch.where(valid, both[0], 0.0)
        entropy[s:e] = torch.where(valid, both[1], 0.0)
    return logprobs, entropy, lse


def _chunked_backward(grad_logprobs, grad_entropy, hidden, weight, labels, lse, entropy, temperature, chunk_size,
                      group=None, start=0):
    """`(d_hidden, d_weight)`, recomputing each chunk's logits; d_hidden is summed over the vocab shards."""
    T, V = hidden.shape[0], weight.shape[0]
    d_hidden = torch.empty_like(hidden)
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        h = hidden[s:e]
        logp = (h @ weight.t()).float() / temperature - lse[s:e, None]
        p = logp.exp()
        valid = (labels[s:e] != IGNORE_INDEX).float()
        g_lp = grad_logprobs[s:e].float() * valid
        g_ent = grad_entropy[s:e].float() * valid
        dz = -p * (g_lp[:, None] + g_ent[:, None] * (logp + entropy[s:e, None]))
        y = labels[s:e].long() - start
        mine = (y >= 0) & (y < V)
        if V:
            dz.scatter_add_(1, y.clamp(0, V - 1)[:, None], (g_lp * mine)[:, None])
        dz = (dz / temperature).to(hidden.dtype)
        d_hidden[s:e] = dz @ weight
        d_weight += (dz.t() @ h).float()
    _all_reduce(d_hidden, group)
    return d_hidden, d_weight.to(weight.dtype)


@torch.library.custom_op("dtllama::linear_logprobs_entropy", mutates_args=())
def _forward(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float, chunk_size: int
             ) -> tuple[Tensor, Tensor, Tensor]:
    return _chunked_forward(hidden, weight, labels, temperature, chunk_size)


@_forward.register_fake
def _(hidden, weight, labels, temperature, chunk_size):
    T = hidden.shape[0]
    return tuple(hidden.new_empty(T, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("dtllama::linear_logprobs_entropy_backward", mutates_args=())
def _backward(
    grad_logprobs: Tensor, grad_entropy: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, lse: Tensor,
    entropy: Tensor, temperature: float, chunk_size: int,
) -> tuple[Tensor, Tensor]:
    return _chunked_backward(grad_logprobs, grad_entropy, hidden, weight, labels, lse, entropy, temperature,
                             chunk_size)


@_backward.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, labels, lse, entropy, temperature, chunk_size):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, temperature, chunk_size = inputs
    ctx.save_for_backward(hidden, weight, labels, output[2], output[1])
    ctx.temperature, ctx.chunk_size = temperature, chunk_size


def _autograd_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    hidden, weight, labels, lse, entropy = ctx.saved_tensors
    zeros = torch.zeros(hidden.shape[0], device=hidden.device)
    d_hidden, d_weight = _backward(
        (zeros if grad_logprobs is None else grad_logprobs).contiguous(),
        (zeros if grad_entropy is None else grad_entropy).contiguous(),
        hidden, weight, labels, lse, entropy, ctx.temperature, ctx.chunk_size,
    )
    return d_hidden, d_weight, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def linear_logprobs_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """fp32 `(logprobs[T], entropy[T])` of `labels` under `softmax(hidden @ weight.T / temperature)`."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [T, H] and [V, H]")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be [T]={hidden.shape[0]}")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        return _dispatch_vocab_parallel(hidden, weight, labels, temperature, chunk_size)
    logprobs, entropy, _ = _forward(hidden.contiguous(), weight, labels, float(temperature), int(chunk_size))
    return logprobs, entropy


# Vocab-parallel dispatch: the output weight is a DTensor sharded on the vocab dim (tensor parallel);
# each rank holds logits of its vocab slice only (see `_chunked_forward` / `_chunked_backward`).


def _vocab_shard(weight):
    """`(local weight, process group, first vocab row of this rank)` of a vocab-sharded DTensor."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = weight.device_mesh
    if mesh.ndim != 1 or weight.placements[0] != Shard(0):
        raise ValueError(f"output weight must be sharded on vocab over a 1-D mesh, got {weight.placements} on {mesh}")
    _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, weight.placements)
    return weight.to_local(), mesh.get_group(), offset[0]


def _all_tokens(hidden, mesh):
    from torch.distributed.tensor import DTensor, Replicate

    return hidden.redistribute(mesh, [Replicate()]).to_local() if isinstance(hidden, DTensor) else hidden


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    """The same chunked computation with the statistics all-reduced over the TP group (a process group
    cannot be a custom-op argument, hence an autograd.Function)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size, group, start):
        logprobs, entropy, lse = _chunked_forward(hidden, weight, labels, temperature, chunk_size, group, start)
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.args = (temperature, chunk_size, group, start)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        temperature, chunk_size, group, start = ctx.args
        d_hidden, d_weight = _chunked_backward(grad_logprobs, grad_entropy, hidden, weight, labels, lse, entropy,
                                               temperature, chunk_size, group, start)
        return d_hidden, d_weight, None, None, None, None, None


def _dispatch_vocab_parallel(hidden, weight, labels, temperature, chunk_size):
    local_w, group, start = _vocab_shard(weight)
    h = _all_tokens(hidden, weight.device_mesh)
    return _VocabParallelLogprobsEntropy.apply(h, local_w, labels, float(temperature), int(chunk_size), group, start)


def linear_logits(hidden: Tensor, weight: Tensor, temperature: float = 1.0) -> Tensor:
    """Full logits `hidden @ weight.T / temperature`; a vocab-sharded weight gives gathered logits."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(weight, DTensor):
        mesh = weight.device_mesh
        if not isinstance(hidden, DTensor):
            hidden = DTensor.from_local(hidden, mesh, [Replicate()], run_check=False)
        return (torch.nn.functional.linear(hidden.redistribute(mesh, [Replicate()]), weight) / temperature).full_tensor()
    return torch.nn.functional.linear(hidden, weight) / temperature
