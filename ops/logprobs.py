"""Per-token log-probs and entropy straight from hidden states, without the `[T, vocab]` logits.

`linear_logprobs_entropy(hidden[T, H], weight[V, H], labels[T])` holds about `chunk_size x V` fp32 logits
at a time. Forward walks token chunks and keeps per-row statistics of z = hidden @ weight.T / temperature
relative to the row max m: s = sum exp(z - m), t = sum exp(z - m) * (z - m) and the label's z_y, giving
lse = m + log s, logprob = (z_y - m) - log s and entropy = log s - t / s. Statistics of disjoint vocab
slices merge exactly (rescaled by exp(m_i - max m)), which is all tensor parallelism needs: each rank
takes its vocab shard and all-reduces max, then sums. Backward walks vocab tiles over all tokens,
recomputing each tile's logits, so each tile's weight gradient is one full matmul (no low-precision
accumulation): d logprob / dz = onehot(label) - p, d entropy / dz = -p * (log p + entropy). Rows
labelled -100 give 0 and receive no gradient. On CUDA the row statistics and logits gradient are Triton
kernels (`_logprobs_triton.py`) between fp32-output cuBLAS matmuls; the torch expressions here are their
spec.

Recomputing makes four `T x V x H` matmuls of three, so forward keeps the first rows' `z - m` within
`save_bytes` (default 2 GiB) and backward reads them instead. Low-precision inputs keep them in fp16: the
values are <= 0 and near 0 where p is large, so each p errs by about p |z - m| 2^-11 (bf16 logits, as a
bf16 `lm_head` writes them, err by |z| 2^-8 in the exponent).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from dtllama.compat import has_mm_out_dtype, local_shape_and_offset

from ._triton import use_triton
from .rmpad import IGNORE_INDEX, check_labels


def _all_reduce(x: Tensor, group, op=None) -> None:
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)


def _fp32_epilogue(a: Tensor) -> bool:
    """Whether a matmul of `a` can write fp32 straight from its accumulator (low precision on CUDA)."""
    return a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and has_mm_out_dtype()


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """`a @ b` in fp32."""
    if _fp32_epilogue(a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def _add_mm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """`acc += a @ b` into the fp32 `acc`."""
    if _fp32_epilogue(a):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += (a @ b).float()


def _row_stats(z: Tensor, y: Tensor, inv_t: float, entropy: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(m, s, t, z_y)` of each row of the fp32 logits `z * inv_t`; `z_y` is 0 where the local label
    `y` is outside `[0, V)`; `t` is 0 without `entropy` (not computed)."""
    if use_triton(z):
        from ._logprobs_triton import row_stats

        return row_stats(z, y, inv_t, entropy)
    z = z * inv_t
    V = z.shape[1]
    if V == 0:
        zero = z.new_zeros(z.shape[0])
        return z.new_full((z.shape[0],), float("-inf")), zero, zero, zero
    m = z.amax(-1)
    d = z - m[:, None]
    e = d.exp()
    mine = (y >= 0) & (y < V)
    picked = z.gather(1, y.clamp(0, V - 1)[:, None].long()).squeeze(1)
    t = (e * d).sum(-1) if entropy else torch.zeros_like(m)
    return m, e.sum(-1), t, torch.where(mine, picked, 0.0)


def _dlogits(z: Tensor, y: Tensor, shift: Tensor, entropy: Tensor, g_lp: Tensor, g_ent: Tensor | None, inv_t: float,
             scale: float, out: Tensor) -> None:
    """Gradient of `sum(g_lp * logprob + g_ent * entropy)` w.r.t. the raw logits of one vocab tile, into `out`,
    from `logprob = z * scale - shift`: the fp32 raw logits (`scale = inv_t`, `shift = lse`) or kept rows
    (`z / temperature - m`, `scale = 1`, `shift = lse - m`). `g_ent` None: no entropy term (`entropy` unread)."""
    if use_triton(z):
        from ._logprobs_triton import dlogits

        return dlogits(z, y, shift, entropy, g_lp, g_ent, inv_t, scale, out)
    logp = z.float() * scale - shift[:, None]
    p = logp.exp()
    dz = -p * (g_lp[:, None] if g_ent is None else g_lp[:, None] + g_ent[:, None] * (logp + entropy[:, None]))
    V = z.shape[1]
    mine = (y >= 0) & (y < V)
    if V:
        dz.scatter_add_(1, y.clamp(0, V - 1)[:, None].long(), (g_lp * mine)[:, None])
    out.copy_(dz * inv_t)


def _keep(z: Tensor, m: Tensor, inv_t: float, out: Tensor) -> None:
    """`out = z * inv_t - m` (logits relative to the row max) in `out`'s dtype, held above its lowest finite
    value (a p of exp(-65504) is 0 either way, and backward must not see -inf)."""
    if use_triton(z):
        from ._logprobs_triton import keep

        return keep(z, m, inv_t, out)
    out.copy_((z * inv_t - m[:, None]).clamp_min(torch.finfo(out.dtype).min))


def kept_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kept rows are stored in: fp16 for low-precision inputs (3 more mantissa bits than bf16, and
    the values are in [-65504, 0]), else the inputs' own."""
    return torch.float16 if dtype in (torch.bfloat16, torch.float16) else dtype


def kept_rows(T: int, V: int, dtype: torch.dtype, save_bytes: int) -> int:
    """How many of `T` rows of `V` logits from `dtype` inputs fit in `save_bytes`."""
    return min(T, save_bytes // max(1, V * kept_dtype(dtype).itemsize))


def _merge(m, s, t, picked, group):
    """Combine the row statistics of the vocab shards of `group` (identity without a group)."""
    import torch.distributed as dist

    if group is None:
        return m, s, t, picked
    top = m.clone()
    _all_reduce(top, group, dist.ReduceOp.MAX)
    scale = torch.where(s > 0, (m - top).exp(), 0.0)
    both = torch.stack([s * scale, torch.where(s > 0, t + (m - top) * s, 0.0) * scale, picked])
    _all_reduce(both, group)
    return top, both[0], both[1], both[2]


def _chunked_forward(hidden, weight, labels, temperature, chunk_size, kept, group=None, start=0, inv_temp=None,
                     with_entropy=True):
    """`(logprobs, entropy, shift, kept logits)` over token chunks: the first `kept` rows' logits are kept
    relative to their row max (`shift` is `lse - m` there, `lse` elsewhere). With a `group`, `weight` holds the
    vocab rows `[start, start + V)` of a vocab-sharded head and the row statistics are merged over the group.
    `inv_temp [T]` (fp32, per token; then `temperature` is 1): each chunk's logits are scaled by it first, so the
    kernels see a temperature of 1. Without `with_entropy` the entropy is not computed (left 0)."""
    T = hidden.shape[0]
    inv_t = 1.0 / temperature
    shift = hidden.new_zeros(T, dtype=torch.float32)
    logprobs, entropy = torch.zeros_like(shift), torch.zeros_like(shift)
    rows = hidden.new_empty((kept, weight.shape[0]), dtype=kept_dtype(hidden.dtype))
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        z = _mm_f32(hidden[s:e], weight.t())
        if inv_temp is not None:
            z.mul_(inv_temp[s:e, None])
        m, se, t, picked = _merge(*_row_stats(z, labels[s:e] - start, inv_t, with_entropy), group)
        log_se = se.log()
        valid = labels[s:e] != IGNORE_INDEX
        logprobs[s:e] = torch.where(valid, (picked - m) - log_se, 0.0)
        if with_entropy:
            entropy[s:e] = torch.where(valid, log_se - t / se, 0.0)
        n = max(0, min(e, kept) - s)
        if n:
            _keep(z[:n], m[:n], inv_t, rows[s:s + n])
        shift[s:e] = torch.cat([log_se[:n], (m + log_se)[n:]]) if n else m + log_se
    return logprobs, entropy, shift, rows


def _vocab_tile(T: int, V: int, chunk_size: int) -> int:
    """Vocab rows per backward tile: `T x tile` logits are about `chunk_size x V` (a multiple of 128
    where that large, for aligned matmuls)."""
    tile = max(1, min(V, chunk_size * V // max(T, 1)))
    return tile if tile < 128 or tile == V else tile // 128 * 128


def _chunked_backward(grad_logprobs, grad_entropy, hidden, weight, labels, shift, entropy, rows, temperature,
                      chunk_size, group=None, start=0, inv_temp=None):
    """`(d_hidden, d_weight)` over vocab tiles: kept `rows` read, the other rows' logits recomputed; d_hidden is
    summed over the vocab shards of `group`. With `inv_temp`, the gradient w.r.t. the scaled logits (recomputed
    ones scaled as forward scaled them) times `inv_temp` is the raw logits'. `grad_entropy` None: the log-probs'
    gradient alone (no entropy was computed, or none is wanted)."""
    T, V, R = hidden.shape[0], weight.shape[0], rows.shape[0]
    inv_t = 1.0 / temperature
    valid = labels != IGNORE_INDEX
    g_lp = torch.where(valid, grad_logprobs.float(), 0.0)
    g_ent = None if grad_entropy is None else torch.where(valid, grad_entropy.float(), 0.0)
    d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    d_weight = torch.empty_like(weight)
    tile = _vocab_tile(T, V, chunk_size)  # bounds the dz tile as well as the recomputed logits
    y = labels - start
    for v0 in range(0, V, tile):
        w = weight[v0:v0 + tile]
        dz = hidden.new_empty((T, w.shape[0]))
        if R:
            _dlogits(rows[:, v0:v0 + tile], y[:R] - v0, shift[:R], entropy[:R], g_lp[:R], _rows(g_ent, 0, R), inv_t,
                     1.0, dz[:R])
        if R < T:
            z = _mm_f32(hidden[R:], w.t())
            if inv_temp is not None:
                z.mul_(inv_temp[R:, None])
            _dlogits(z, y[R:] - v0, shift[R:], entropy[R:], g_lp[R:], _rows(g_ent, R, T), inv_t, inv_t, dz[R:])
        if inv_temp is not None:
            dz.mul_(inv_temp[:, None].to(dz.dtype))
        if d_weight.dtype == dz.dtype:
            torch.mm(dz.t(), hidden, out=d_weight[v0:v0 + tile])
        else:
            d_weight[v0:v0 + tile] = dz.t() @ hidden
        _add_mm_f32_(d_hidden, dz, w)
    _all_reduce(d_hidden, group)
    return d_hidden.to(hidden.dtype), d_weight


def _rows(x: Tensor | None, start: int, end: int) -> Tensor | None:
    return None if x is None else x[start:end]


@torch.library.custom_op("dtllama::linear_logprobs_entropy", mutates_args=())
def _forward(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float, chunk_size: int, kept: int,
             inv_temp: Tensor | None, with_entropy: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _chunked_forward(hidden, weight, labels, temperature, chunk_size, kept, inv_temp=inv_temp,
                            with_entropy=with_entropy)


@_forward.register_fake
def _(hidden, weight, labels, temperature, chunk_size, kept, inv_temp, with_entropy=True):
    T = hidden.shape[0]
    return (*(hidden.new_empty(T, dtype=torch.float32) for _ in range(3)),
            hidden.new_empty((kept, weight.shape[0]), dtype=kept_dtype(hidden.dtype)))


@torch.library.custom_op("dtllama::linear_logprobs_entropy_backward", mutates_args=())
def _backward(
    grad_logprobs: Tensor, grad_entropy: Tensor | None, hidden: Tensor, weight: Tensor, labels: Tensor,
    shift: Tensor, entropy: Tensor, rows: Tensor, temperature: float, chunk_size: int, inv_temp: Tensor | None,
) -> tuple[Tensor, Tensor]:
    return _chunked_backward(grad_logprobs, grad_entropy, hidden, weight, labels, shift, entropy, rows, temperature,
                             chunk_size, inv_temp=inv_temp)


@_backward.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, labels, shift, entropy, rows, temperature, chunk_size, inv_temp):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, temperature, chunk_size, _, inv_temp, *with_entropy = inputs
    ctx.save_for_backward(hidden, weight, labels, output[2], output[1], output[3], inv_temp)
    ctx.temperature, ctx.chunk_size = temperature, chunk_size
    ctx.with_entropy = with_entropy[0] if with_entropy else True


def _autograd_backward(ctx, grad_logprobs, grad_entropy, _grad_shift, _grad_rows):
    hidden, weight, labels, shift, entropy, rows, inv_temp = ctx.saved_tensors
    zeros = torch.zeros_like(shift)  # a DTensor when the inputs are
    if not ctx.with_entropy:
        grad_entropy = None  # no entropy was computed: its gradient is not read (None: no entropy term either)
    d_hidden, d_weight = _backward(
        (zeros if grad_logprobs is None else grad_logprobs).contiguous(),
        None if grad_entropy is None else grad_entropy.contiguous(),
        hidden, weight, labels, shift, entropy, rows, ctx.temperature, ctx.chunk_size, inv_temp,
    )
    return d_hidden, d_weight, None, None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


SAVE_BYTES = 2 * 2**30  # logit rows kept from forward to backward by default (see the module docstring)


def linear_logprobs_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float | Tensor = 1.0, chunk_size: int = 1024,
    check: bool = True, save_bytes: int = SAVE_BYTES, entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """fp32 `(logprobs[T], entropy[T])` of `labels` under `softmax(hidden @ weight.T / temperature)`;
    `entropy=False` gives `(logprobs, None)` and skips the entropy's work in forward and backward (a loss without
    an entropy term), the log-probs and their gradients bitwise those of the default.

    `temperature`: one for all tokens, or a positive `[T]` tensor, one per token (a rollout's per-request
    temperatures broadcast over each sequence's tokens: see the causal LM's `temperature`).

    `check=False` skips validating the labels (one device sync), for callers that already did
    (the model's `check_packed`). `save_bytes`: memory for logit rows kept from forward to backward,
    each saving its recompute (0: recompute all). Sequence-parallel (token-sharded DTensor)
    inputs keep none.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [T, H] and [V, H]")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be [T]={hidden.shape[0]}")
    inv_temp = None
    if isinstance(temperature, Tensor):
        inv_temp, temperature = _inverse_temperatures(temperature, hidden.shape[0], check), 1.0
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    if save_bytes < 0:
        raise ValueError(f"save_bytes={save_bytes} must be >= 0 (0 recomputes every row's logits in backward)")

    if check and not torch.compiler.is_compiling():
        check_labels(labels, weight.shape[0])
    if isinstance(weight, DTensor) and any(p == Shard(0) for p in weight.placements):
        logprobs, ent = _dispatch_vocab_parallel(hidden, weight, labels, temperature, chunk_size, save_bytes, inv_temp,
                                                 bool(entropy))
        return logprobs, ent if entropy else None
    kept = 0 if isinstance(hidden, DTensor) else kept_rows(hidden.shape[0], weight.shape[0], hidden.dtype, save_bytes)
    if isinstance(hidden, DTensor):
        # Labels (and temperatures) come whole; their slices follow the tokens of `hidden` (a local split).
        labels = _like_tokens(labels, hidden)
        inv_temp = None if inv_temp is None else _like_tokens(inv_temp, hidden)
    logprobs, ent, _, _ = _forward(hidden.contiguous(), weight, labels, float(temperature), int(chunk_size), kept,
                                   inv_temp, bool(entropy))
    return logprobs, ent if entropy else None


def _like_tokens(x: Tensor, hidden: DTensor) -> Tensor:
    """A whole per-token tensor as a DTensor placed as `hidden`'s tokens (a local split, no communication)."""
    if isinstance(x, DTensor):
        return x
    mesh = hidden.device_mesh
    return DTensor.from_local(x, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(mesh, hidden.placements)


def _inverse_temperatures(temperature: Tensor, T: int, check: bool) -> Tensor:
    """`1 / temperature` in fp32 of a per-token `[T]` tensor, checked (positive) unless `check` is off."""
    if temperature.shape != (T,):
        raise ValueError(f"temperature of shape {tuple(temperature.shape)} must be a float or one per token [T]={T}")
    local = temperature.to_local() if isinstance(temperature, DTensor) else temperature
    if check and not torch.compiler.is_compiling() and local.numel() and bool((local <= 0).any()):
        raise ValueError(f"temperature must be positive; got min {float(local.min())}")
    return 1.0 / temperature.float()


# Sequence / data parallel: tokens are independent rows, so `Shard(0)` of hidden, labels and the
# per-token outputs is exact with a replicated weight, whose gradient is then a partial sum.
# (Token-sharded inputs keep no log-softmax rows: the kept tensor is empty, its placement follows the tokens.)
@register_sharding(torch.ops.dtllama.linear_logprobs_entropy.default)
def _(hidden, weight, labels, temperature, chunk_size, kept, inv_temp, with_entropy=True):
    t = inv_temp is not None
    return [([Shard(0)] * 4, [Shard(0), Replicate(), Shard(0), None, None, None, Shard(0) if t else None, None]),
            ([Replicate()] * 4, [Replicate()] * 3 + [None, None, None, Replicate() if t else None, None])]


@register_sharding(torch.ops.dtllama.linear_logprobs_entropy_backward.default)
def _(grad_logprobs, grad_entropy, hidden, weight, labels, shift, entropy, rows, temperature, chunk_size, inv_temp):
    t, e = inv_temp is not None, grad_entropy is not None
    return [([Shard(0), Partial()], [Shard(0), Shard(0) if e else None, Shard(0), Replicate(), Shard(0), Shard(0),
                                     Shard(0), Shard(0), None, None, Shard(0) if t else None]),
            ([Replicate(), Replicate()], [Replicate(), Replicate() if e else None] + [Replicate()] * 6
             + [None, None, Replicate() if t else None])]


# Vocab-parallel dispatch: the output weight is a DTensor sharded on the vocab dim (tensor parallel);
# each rank holds logits of its vocab slice only (see `_chunked_forward` / `_chunked_backward`).


def _vocab_shard(weight):
    """`(local weight, process group, first vocab row of this rank)` of a vocab-sharded DTensor."""
    mesh = weight.device_mesh
    if mesh.ndim != 1 or weight.placements[0] != Shard(0):
        raise ValueError(f"output weight must be sharded on vocab over a 1-D mesh, got {weight.placements} on {mesh}")
    _, offset = local_shape_and_offset(weight)
    return weight.to_local(), mesh.get_group(), offset[0]


def _all_tokens(hidden, mesh):
    return hidden.redistribute(mesh, [Replicate()]).to_local() if isinstance(hidden, DTensor) else hidden


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    """The same chunked computation with the statistics all-reduced over the TP group (a process group
    cannot be a custom-op argument, hence an autograd.Function)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size, kept, group, start, inv_temp, with_entropy):
        logprobs, entropy, shift, rows = _chunked_forward(hidden, weight, labels, temperature, chunk_size, kept, group,
                                                          start, inv_temp, with_entropy)
        ctx.save_for_backward(hidden, weight, labels, shift, entropy, rows, inv_temp)
        ctx.args = (temperature, chunk_size, group, start, with_entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, labels, shift, entropy, rows, inv_temp = ctx.saved_tensors
        temperature, chunk_size, group, start, with_entropy = ctx.args
        d_hidden, d_weight = _chunked_backward(grad_logprobs, grad_entropy if with_entropy else None, hidden, weight,
                                               labels, shift, entropy, rows, temperature, chunk_size, group, start,
                                               inv_temp)
        return d_hidden, d_weight, None, None, None, None, None, None, None, None


def _dispatch_vocab_parallel(hidden, weight, labels, temperature, chunk_size, save_bytes, inv_temp, with_entropy):
    local_w, group, start = _vocab_shard(weight)
    h = _all_tokens(hidden, weight.device_mesh)
    kept = kept_rows(h.shape[0], local_w.shape[0], h.dtype, save_bytes)
    if isinstance(inv_temp, DTensor):
        inv_temp = inv_temp.full_tensor()
    return _VocabParallelLogprobsEntropy.apply(h, local_w, labels, float(temperature), int(chunk_size), kept, group,
                                               start, inv_temp, with_entropy)


def linear_logits(hidden: Tensor, weight: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """Full logits `hidden @ weight.T / temperature` (a float, or one per token `[T]`); a vocab-sharded weight gives
    gathered logits."""
    if isinstance(temperature, Tensor):
        temperature = temperature.float()[:, None]
    if isinstance(weight, DTensor):
        mesh = weight.device_mesh
        if not isinstance(hidden, DTensor):
            hidden = DTensor.from_local(hidden, mesh, [Replicate()], run_check=False)
        logits = torch.nn.functional.linear(hidden.redistribute(mesh, [Replicate()]), weight).full_tensor()
        return logits / temperature
    return torch.nn.functional.linear(hidden, weight) / temperature


# Top-k log-probs of every position (distillation from a teacher, a KL on the top-k): token chunks as above; under
# TP each rank takes the top-k of its vocab slice and the k x tp candidates are merged.


def _topk_chunk(z: Tensor, k: int, group, start: int) -> tuple[Tensor, Tensor, Tensor]:
    """`(log-probs [n, k], global vocab ids [n, k], lse [n])` of the scaled fp32 logits `z` of one token chunk,
    `z` holding vocab columns `[start, start + V)` of the group's vocabulary. The log-sum-exp is the log-prob op's
    row statistics merged over the group (`_row_stats`, `_merge`; no label is read)."""
    import torch.distributed as dist

    no_label = torch.full((z.shape[0],), -1, dtype=torch.long, device=z.device)
    m, se, _, _ = _merge(*_row_stats(z, no_label, 1.0), group)
    lse = m + se.log()
    values, ids = z.topk(min(k, z.shape[1]), dim=-1)
    ids = ids + start
    if group is not None:
        n = dist.get_world_size(group)
        gathered = [torch.empty_like(values) for _ in range(n)], [torch.empty_like(ids) for _ in range(n)]
        dist.all_gather(gathered[0], values.contiguous(), group=group)
        dist.all_gather(gathered[1], ids.contiguous(), group=group)
        values, ids = torch.cat(gathered[0], -1), torch.cat(gathered[1], -1)
        values, pick = values.topk(k, dim=-1)
        ids = ids.gather(1, pick)
    return values - lse[:, None], ids, lse


class _TopkLogprobs(torch.autograd.Function):
    """Top-k log-probs by token chunks (no `[T, vocab]` logits); backward recomputes each chunk's logits:
    d logp_j / dz = onehot(id_j) - p, so dz = scatter(g) - p * sum(g)."""

    @staticmethod
    def forward(ctx, hidden, weight, k, inv_t, chunk_size, group, start):
        T = hidden.shape[0]
        values = hidden.new_empty((T, k), dtype=torch.float32)
        ids = torch.empty((T, k), dtype=torch.long, device=hidden.device)
        lse = hidden.new_empty(T, dtype=torch.float32)
        for s in range(0, T, chunk_size):
            z = _mm_f32(hidden[s:s + chunk_size], weight.t()) * inv_t
            values[s:s + chunk_size], ids[s:s + chunk_size], lse[s:s + chunk_size] = _topk_chunk(z, k, group, start)
        ctx.save_for_backward(hidden, weight, ids, lse)
        ctx.args = (inv_t, chunk_size, group, start)
        ctx.mark_non_differentiable(ids)
        return values, ids

    @staticmethod
    def backward(ctx, grad_values, _grad_ids):
        """Over vocab tiles of all tokens, as the log-prob op's backward: each tile's weight gradient one matmul in
        the weight's dtype, the hidden gradient accumulated in fp32; about `chunk_size x V` logits at a time."""
        hidden, weight, ids, lse = ctx.saved_tensors
        inv_t, chunk_size, group, start = ctx.args
        T, V = hidden.shape[0], weight.shape[0]
        g = grad_values.float()
        g_sum, local = g.sum(-1, keepdim=True), ids - start
        d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        d_weight = torch.empty_like(weight)
        tile = _vocab_tile(T, V, chunk_size)
        for v0 in range(0, V, tile):
            w = weight[v0:v0 + tile]
            n = w.shape[0]
            dz = _mm_f32(hidden, w.t()).mul_(inv_t).sub_(lse[:, None]).exp_().mul_(-g_sum)  # -p * sum(g), in place
            rel = local - v0
            dz.scatter_add_(1, rel.clamp(0, n - 1), torch.where((rel >= 0) & (rel < n), g, 0.0))
            dz = dz.mul_(inv_t).to(hidden.dtype)
            d_weight[v0:v0 + tile] = dz.t() @ hidden
            _add_mm_f32_(d_hidden, dz, w)
        _all_reduce(d_hidden, group)
        return d_hidden.to(hidden.dtype), d_weight, None, None, None, None, None


def linear_topk_logprobs(hidden: Tensor, weight: Tensor, k: int, temperature: float | Tensor = 1.0,
                         chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """`(log-probs [T, k] fp32, vocab ids [T, k])`: the k most likely tokens of every position under
    `softmax(hidden @ weight.T / temperature)`, largest first, as `torch.topk` of the full log-softmax, without the
    `[T, vocab]` logits; differentiable through the log-probs (a KL on the top-k). A vocab-sharded weight (TP) takes
    each rank's top-k and merges them; a token-sharded hidden (sequence parallel) is gathered first."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [T, H] and [V, H]")
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"k={k} must be in 1..vocab size {weight.shape[0]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    scale = None
    if isinstance(temperature, Tensor):  # one per token: the hidden rows scaled (autograd carries it)
        scale = _inverse_temperatures(temperature, hidden.shape[0], True)
        scale = scale.full_tensor() if isinstance(scale, DTensor) else scale
        temperature = 1.0
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    if isinstance(weight, DTensor):
        local_w, group, start = _vocab_shard(weight)
        h = _all_tokens(hidden, weight.device_mesh)
    else:
        local_w, group, start = weight, None, 0
        h = hidden.full_tensor() if isinstance(hidden, DTensor) else hidden
    if scale is not None:
        h = h * scale[:, None].to(h.dtype)
    return _TopkLogprobs.apply(h, local_w, k, 1.0 / temperature, chunk_size, group, start)
