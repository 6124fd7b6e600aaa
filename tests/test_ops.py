"""dtllama.ops against naive references (fp32, CPU)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import logprobs_entropy_reference, rel_err, rms_norm_reference

from dtllama.ops import (
    IGNORE_INDEX, cu_seqlens_from_lengths, linear_logprobs_entropy, pack, position_ids_from_cu_seqlens,
    shift_labels, unpack, varlen_attention,
)


def naive_logprobs_entropy(hidden, weight, labels, temperature=1.0):
    return logprobs_entropy_reference((hidden @ weight.t()) / temperature, labels)


@settings(max_examples=200, deadline=None)
@given(T=st.integers(1, 40), V=st.integers(2, 70), H=st.integers(1, 16), chunk=st.integers(1, 17),
       temperature=st.sampled_from([1.0, 0.7, 1.3]), kept=st.integers(0, 45), seed=st.integers(0, 2**31 - 1))
def test_linear_logprobs_entropy_matches_naive(T, V, H, chunk, temperature, kept, seed):
    """`kept` rows' logits budgeted from forward to backward (none, some or all of the T rows)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).requires_grad_()
    weight = torch.randn(V, H, generator=g).requires_grad_()
    labels = torch.randint(0, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < 0.3] = IGNORE_INDEX
    w_lp, w_ent = torch.randn(T, generator=g), torch.randn(T, generator=g)

    lp, ent = linear_logprobs_entropy(hidden, weight, labels, temperature, chunk, save_bytes=kept * V * 4)
    (lp * w_lp + ent * w_ent).sum().backward()
    got = (lp, ent, hidden.grad.clone(), weight.grad.clone())
    # Reference: the naive computation in fp64 (naive fp32 is itself up to ~1e-6 off it, e.g. hidden
    # gradients with logits near 16). Tolerance 1e-6 absolute, or relative to the magnitude of the terms
    # summed where that exceeds 1: fp32 rounding scales with the terms, not with the result (log-probs
    # are differences of logits, and their gradients carry p * |logit| of that rounding into sums of
    # signed products). Ignored rows must be exactly 0.
    h64, w64 = hidden.detach().double(), weight.detach().double()
    z64 = ((h64 @ w64.t()) / temperature).requires_grad_()
    ref_lp, ref_ent = logprobs_entropy_reference(z64, labels)
    (ref_lp * w_lp + ref_ent * w_ent).sum().backward()
    ref = (ref_lp, ref_ent, z64.grad @ w64 / temperature, z64.grad.t() @ h64 / temperature)
    p64 = z64.detach().softmax(-1)
    g = (w_lp.abs() + w_ent.abs()).double()[:, None]
    dz = (z64.grad.abs() + p64 * g * z64.detach().abs().amax(-1, keepdim=True)) / temperature
    terms = (z64.abs().max(), z64.abs().max(), (dz @ w64.abs()).max(), (dz.t() @ h64.abs()).max())
    for i, (a, b) in enumerate(zip(got, ref)):
        assert rel_err(a, b, floor=max(1.0, float(terms[i]))) <= 1e-6, (i, a, b)


def test_linear_logprobs_entropy_compiles_fullgraph():
    torch._dynamo.reset()
    hidden, weight = torch.randn(9, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    labels = torch.randint(0, 30, (9,))
    f = torch.compile(lambda h, w, y: linear_logprobs_entropy(h, w, y, 1.0, 4), fullgraph=True, backend="aot_eager")
    lp, ent = f(hidden, weight, labels)
    (lp.sum() + ent.sum()).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref_lp, ref_ent = naive_logprobs_entropy(hidden, weight, labels)
    assert torch.allclose(lp, ref_lp, atol=1e-6) and torch.allclose(ent, ref_ent, atol=1e-6)
    (ref_lp.sum() + ref_ent.sum()).backward()
    assert hidden.grad is not None and weight.grad is not None
    for got, want in zip(grads, (hidden.grad, weight.grad)):
        assert rel_err(got, want, floor=1.0) <= 1e-5  # fp32, sums in another order


def naive_attention(q, k, v, cu_seqlens):
    """Loop over sequences, causal softmax attention with KV heads repeated."""
    rep = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        qs, ks, vs = q[s:e], k[s:e].repeat_interleave(rep, 1), v[s:e].repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(torch.ones(e - s, e - s).triu(1).bool(), float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
    return out


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5), kv=st.sampled_from([1, 2, 4]),
       rep=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31 - 1))
def test_varlen_attention_matches_per_sequence_loop(lengths, kv, rep, seed):
    g = torch.Generator().manual_seed(seed)
    T, D = sum(lengths), 8
    q = torch.randn(T, kv * rep, D, generator=g)
    k, v = torch.randn(T, kv, D, generator=g), torch.randn(T, kv, D, generator=g)
    cu = cu_seqlens_from_lengths(lengths)
    out = varlen_attention(q, k, v, cu, max(lengths))
    assert torch.allclose(out, naive_attention(q, k, v, cu), atol=1e-5)  # fp32 softmax rounding


def test_a_call_backend_overrides_the_process_default(monkeypatch):
    """`varlen_attention(..., backend=)` wins over `set_attention_backend`, eager and compiled with fullgraph (the
    name is a constant at trace time). On CPU only `sdpa` (and `auto`, which picks it) can run: a process default
    of `flex` is refused, a call asking for `sdpa` runs, and a call asking for a CUDA backend is refused whatever
    the default. Tolerance: fp32 softmax rounding, as in the per-sequence loop test (1e-5)."""
    import pytest

    from dtllama.ops import BACKENDS, attention, attention_backend, set_attention_backend

    monkeypatch.setattr(attention, "_backend", attention._backend)  # the process default is restored afterwards
    g = torch.Generator().manual_seed(20260)
    lengths, D = [5, 1, 9, 3], 8
    T = sum(lengths)
    q, k, v = torch.randn(T, 4, D, generator=g), torch.randn(T, 2, D, generator=g), torch.randn(T, 2, D, generator=g)
    cu = cu_seqlens_from_lengths(lengths)
    ref = naive_attention(q, k, v, cu)
    set_attention_backend("sdpa")
    sdpa = varlen_attention(q, k, v, cu, max(lengths))
    assert torch.allclose(sdpa, ref, atol=1e-5)

    set_attention_backend("flex")
    with pytest.raises(ValueError, match="'flex' cannot run here: it needs a CUDA device.*DTLLAMA_ATTENTION=auto"):
        varlen_attention(q, k, v, cu, max(lengths))
    for name in ("sdpa", "auto"):
        assert attention_backend(q.device, q.dtype, backend=name) == "sdpa"
        assert torch.allclose(varlen_attention(q, k, v, cu, max(lengths), backend=name), sdpa, atol=1e-5)
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: varlen_attention(q, k, v, cu, max(lengths), backend="sdpa"), fullgraph=True,
                      backend="aot_eager")
    assert torch.allclose(f(q, k, v), sdpa, atol=1e-5)
    assert attention._backend == "flex"  # a call's choice does not touch the process default

    set_attention_backend("sdpa")
    for name in ("flex", "varlen", "cudnn"):
        with pytest.raises(ValueError, match=f"'{name}' cannot run here: it needs a CUDA device.*backend='auto'"):
            varlen_attention(q, k, v, cu, max(lengths), backend=name)
    with pytest.raises(ValueError, match=r"attention backend 'flash3' is unknown; choose one of \[" +
                       ", ".join(repr(b) for b in BACKENDS) + r"\]"):
        varlen_attention(q, k, v, cu, max(lengths), backend="flash3")


def test_pack_unpack_roundtrip_and_positions():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (3, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    p = pack(ids, mask)
    assert p.cu_seqlens.tolist() == [0, 3, 7, 13] and p.max_seqlen == 6
    assert p.position_ids.tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert torch.equal(position_ids_from_cu_seqlens(p.cu_seqlens, 13), p.position_ids)
    back = unpack(p.input_ids, p.indices, 3, 6)
    assert torch.equal(back[mask], ids[mask]) and int(back[~mask].abs().sum()) == 0
    labels = shift_labels(p.input_ids, p.cu_seqlens)
    assert labels[[2, 6, 12]].tolist() == [IGNORE_INDEX] * 3
    assert torch.equal(labels[:2], p.input_ids[1:3])


def test_custom_ops_take_sequence_sharded_dtensors():
    """Registered sharding strategies: tokens `Shard(0)` over 2 ranks, weights replicated; outputs stay
    sharded and weight gradients (partial sums) reduce to the single-process ones. Tolerance: fp32
    rounding of sums taken in a different order (1e-6 relative); the head's gradient sums signed
    per-token terms over differently sized vocab tiles and cancels more (1e-5)."""
    from pool import get_pool
    from torch.distributed.tensor import Partial, Shard

    from ops_dtensor_job import run_rank

    for rank_out in get_pool(2).run(run_rank, 0, 10, 24, 33):
        assert rank_out["rms_norm placements"] == ((Shard(0),), (Shard(0),))  # output and input gradient
        assert rank_out["logprobs placements"] == (Shard(0),)
        assert max(rank_out["rms_norm"]) <= 1e-6, rank_out["rms_norm"]
        assert max(rank_out["logprobs"][:3]) <= 1e-6 and rank_out["logprobs"][3] <= 1e-5, rank_out["logprobs"]
        assert rank_out["loss placements"][0] == (Partial(),)  # each rank's share of the sum
        assert max(rank_out["loss"][:2]) <= 1e-6 and rank_out["loss"][2] <= 1e-5, rank_out["loss"]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 30), H=st.integers(1, 64), seed=st.integers(0, 2**31 - 1))
def test_rms_norm_op_matches_autograd_of_hf_formula(rows, H, seed):
    """The op's explicit backward against autograd through HF's formula, fp32. Tolerance: 1e-5 of the
    terms that dx subtracts (dy * w * rstd; they cancel when a row is nearly one element)."""
    from dtllama.ops import rms_norm

    g = torch.Generator().manual_seed(seed)
    x, w, dy = torch.randn(rows, H, generator=g), torch.rand(H, generator=g) + 0.5, torch.randn(rows, H, generator=g)
    a, b = (x.clone().requires_grad_() for _ in range(2))
    wa, wb = (w.clone().requires_grad_() for _ in range(2))
    rms_norm(a, wa, 1e-6).backward(dy)
    ref = rms_norm_reference(b, wb, 1e-6)
    ref.backward(dy)
    terms = float((dy.abs() * w * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).max())
    for got, want, scale in ((rms_norm(x, w, 1e-6), ref, 1.0), (a.grad, b.grad, terms), (wa.grad, wb.grad, 1.0)):
        assert rel_err(got, want, floor=scale) <= 1e-5


def test_rms_norm_and_linear_cross_entropy_compile_fullgraph():
    from dtllama.ops import linear_cross_entropy, rms_norm

    torch._dynamo.reset()
    x, w = torch.randn(9, 8, requires_grad=True), torch.rand(8, requires_grad=True)
    head, y = torch.randn(30, 8, requires_grad=True), torch.randint(0, 30, (9,))

    def f(x, w, head, y):
        return linear_cross_entropy(rms_norm(x, w, 1e-5), head, y, chunk_size=4)

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, head, y)
    loss.backward()
    grads = [t.grad.clone() for t in (x, w, head)]
    for t in (x, w, head):
        t.grad = None
    lp, _ = naive_logprobs_entropy(rms_norm(x, w, 1e-5), head, y)
    ref = -lp.mean()
    ref.backward()
    assert rel_err(loss, ref, floor=1.0) <= 1e-6
    for got, t in zip(grads, (x, w, head)):
        assert rel_err(got, t.grad, floor=1.0) <= 1e-5


def test_labels_outside_the_vocabulary_are_an_error():
    import pytest

    hidden, weight = torch.randn(3, 8), torch.randn(30, 8)
    for bad in (30, 5000, -7):
        with pytest.raises(ValueError, match=f"label {bad} is outside the vocabulary \\[0, 30\\)"):
            linear_logprobs_entropy(hidden, weight, torch.tensor([1, bad, IGNORE_INDEX]))
