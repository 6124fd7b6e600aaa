"""Per-token log-probs and entropy straight from hidden states, chunk by chunk over tokens.

`linear_logprobs_entropy(hidden[T, H], weight[V, H], labels[T])` never holds more than
`chunk_size x V` logits: the forward keeps only `[T]` results, and the backward recomputes each
chunk's logits. This CPU/any-device implementation is the spec for the fused GPU kernel.

Math per row, with z = hidden @ weight.T / temperature and p = softmax(z):
  logprob = log p[label],               entropy H = -sum(p * log p)
  d logprob / dz = onehot(label) - p,   d H / dz = -p * (log p + H)
(written with log p rather than z - logsumexp(z), which would cancel large terms in fp32).
Rows whose label is -100 give 0 for both and receive no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rmpad import IGNORE_INDEX


def _chunk_stats(h: Tensor, weight: Tensor, temperature: float):
    logp = torch.log_softmax((h @ weight.t()).float() / temperature, -1)
    p = logp.exp()
    return logp, p, -(p * logp).sum(-1)


@torch.library.custom_op("dtllama::linear_logprobs_entropy", mutates_args=())
def _forward(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float, chunk_size: int) -> tuple[Tensor, Tensor]:
    T = hidden.shape[0]
    logprobs = hidden.new_zeros(T, dtype=torch.float32)
    entropy = hidden.new_zeros(T, dtype=torch.float32)
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        logp, _, ent = _chunk_stats(hidden[s:e], weight, temperature)
        y = labels[s:e]
        valid = y != IGNORE_INDEX
        picked = logp.gather(1, y.clamp_min(0).long()[:, None]).squeeze(1)
        logprobs[s:e] = torch.where(valid, picked, 0.0)
        entropy[s:e] = torch.where(valid, ent, 0.0)
    return logprobs, entropy


@_forward.register_fake
def _(hidden, weight, labels, temperature, chunk_size):
    T = hidden.shape[0]
    return hidden.new_empty(T, dtype=torch.float32), hidden.new_empty(T, dtype=torch.float32)


@torch.library.custom_op("dtllama::linear_logprobs_entropy_backward", mutates_args=())
def _backward(
    grad_logprobs: Tensor, grad_entropy: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor,
    temperature: float, chunk_size: int,
) -> tuple[Tensor, Tensor]:
    T = hidden.shape[0]
    d_hidden = torch.empty_like(hidden)
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        h = hidden[s:e]
        logp, p, ent = _chunk_stats(h, weight, temperature)
        y = labels[s:e]
        valid = (y != IGNORE_INDEX).float()
        g_lp = grad_logprobs[s:e].float() * valid
        g_ent = grad_entropy[s:e].float() * valid
        dz = -p * (g_lp[:, None] + g_ent[:, None] * (logp + ent[:, None]))
        dz.scatter_add_(1, y.clamp_min(0).long()[:, None], g_lp[:, None])
        dz = (dz / temperature).to(hidden.dtype)
        d_hidden[s:e] = dz @ weight
        d_weight += (dz.t() @ h).float()
    return d_hidden, d_weight.to(weight.dtype)


@_backward.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, labels, temperature, chunk_size):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, temperature, chunk_size = inputs
    ctx.save_for_backward(hidden, weight, labels)
    ctx.temperature, ctx.chunk_size = temperature, chunk_size


def _autograd_backward(ctx, grad_logprobs, grad_entropy):
    hidden, weight, labels = ctx.saved_tensors
    if grad_logprobs is None:
        grad_logprobs = torch.zeros(hidden.shape[0], device=hidden.device)
    if grad_entropy is None:
        grad_entropy = torch.zeros(hidden.shape[0], device=hidden.device)
    d_hidden, d_weight = _backward(
        grad_logprobs.contiguous(), grad_entropy.contiguous(), hidden, weight, labels, ctx.temperature,
        ctx.chunk_size,
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
    return _forward(hidden.contiguous(), weight, labels, float(temperature), int(chunk_size))


# Vocab-parallel variant: the output weight is a DTensor sharded on the vocab dim (tensor parallel).
# Each rank holds logits of its vocab slice only; max, sum-exp, the picked log-prob and the entropy
# are combined with all-reduces, and d_hidden, partial over the vocab slices, is all-reduced once.


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
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size, group, start):
        import torch.distributed as dist

        T, V = hidden.shape[0], weight.shape[0]
        lse = hidden.new_zeros(T, dtype=torch.float32)
        logprobs, entropy = torch.zeros_like(lse), torch.zeros_like(lse)
        for s in range(0, T, chunk_size):
            e = min(s + chunk_size, T)
            z = (hidden[s:e] @ weight.t()).float() / temperature
            m = z.amax(-1) if V else z.new_full((e - s,), float("-inf"))
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            se = torch.exp(z - m[:, None]).sum(-1)
            dist.all_reduce(se, group=group)
            lse[s:e] = m + se.log()
            logp = z - lse[s:e, None]
            y = labels[s:e].long() - start
            mine = (y >= 0) & (y < V)
            picked = torch.where(mine, logp.gather(1, y.clamp(0, max(V - 1, 0))[:, None]).squeeze(1) if V else 0.0, 0.0)
            both = torch.stack([picked, -(logp.exp() * logp).sum(-1)])
            dist.all_reduce(both, group=group)
            valid = labels[s:e] != IGNORE_INDEX
            logprobs[s:e] = torch.where(valid, both[0], 0.0)
            entropy[s:e] = torch.where(valid, both[1], 0.0)
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.args = (temperature, chunk_size, group, start)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        import torch.distributed as dist

        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        temperature, chunk_size, group, start = ctx.args
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
        dist.all_reduce(d_hidden, group=group)
        return d_hidden, d_weight.to(weight.dtype), None, None, None, None, None


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
