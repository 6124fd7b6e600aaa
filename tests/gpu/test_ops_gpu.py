"""CUDA paths of the custom ops (Triton kernels, varlen attention backends) against their CPU specs."""

import pytest
import torch
import torch.nn.functional as F
from helpers import logprobs_entropy_reference, rms_norm_reference
from helpers import rel_err as rel

from dtllama.ops.attention import unavailable_reason
from dtllama.ops import (
    IGNORE_INDEX, CrossEntropy, cu_seqlens_from_lengths, linear_cross_entropy, linear_logprobs_entropy, rms_norm,
    set_attention_backend, varlen_attention,
)

pytestmark = pytest.mark.gpu

# bf16 keeps 8 bits of mantissa: one rounding of an output is up to 2^-8 relative to it, a few
# roundings of the inputs of a reduction stay within 1e-2 of its largest value.
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


def fro(a, b):
    """Relative error in the Frobenius norm."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def fp32_reference(x, w, dy, eps):
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y = rms_norm_reference(xr, wr, eps)
    y.backward(dy.float())
    return y, xr.grad, wr.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,hidden", [(1, 576), (7, 1000), (3000, 2048), (4096, 4096), (513, 8192), (64, 16384)])
def test_rms_norm_triton_matches_fp32_reference(dtype, rows, hidden):
    g = torch.Generator(device="cuda").manual_seed(rows + hidden)
    x = torch.randn(rows, hidden, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.rand(hidden, device="cuda", generator=g) + 0.5).to(dtype).requires_grad_()
    dy = torch.randn(rows, hidden, device="cuda", generator=g).to(dtype)
    y = rms_norm(x, w, 1e-5)
    y.backward(dy)
    ref_y, ref_dx, ref_dw = fp32_reference(x, w, dy, 1e-5)
    assert y.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == dtype
    errs = [rel(y, ref_y), rel(x.grad, ref_dx), rel(w.grad, ref_dw)]
    assert max(errs) <= TOL[dtype], errs


def test_rms_norm_compiles_fullgraph_on_cuda():
    torch._dynamo.reset()
    x = torch.randn(300, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    f = torch.compile(lambda x, w: rms_norm(x * 2, w, 1e-5).sum(), fullgraph=True)
    f(x, w).backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    rms_norm(x * 2, w, 1e-5).sum().backward()
    assert rel(grads[0], x.grad) <= 1e-2 and rel(grads[1], w.grad) <= 1e-2


@pytest.mark.parametrize("backend", ["fa4", "flash", "cudnn", "varlen", "flex"])
@pytest.mark.parametrize("lengths", [[1], [1, 1, 1], [37, 1, 200, 5, 64], [2048], [256] * 3, "random"])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
def test_varlen_backends_match_sdpa_reference(backend, lengths, heads):
    if lengths == "random":  # a fresh draw every run, printed on failure
        lengths = torch.randint(1, 300, (int(torch.randint(1, 12, ())),)).tolist()
    why = unavailable_reason(backend, torch.device("cuda"), torch.bfloat16, 64, len(set(lengths)) == 1)
    if why is not None:
        pytest.skip(f"{backend} cannot run here: {why}")
    g = torch.Generator(device="cuda").manual_seed(len(lengths))
    T, (hq, hkv) = sum(lengths), heads
    q = torch.randn(T, hq, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(T, hkv, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    do = torch.randn(T, hq, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    cu = cu_seqlens_from_lengths(lengths, device="cuda")
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    try:
        set_attention_backend("sdpa")
        ref = varlen_attention(*ref_in, cu, max(lengths))
        ref.backward(do.float())
        set_attention_backend(backend)
        out = varlen_attention(q, k, v, cu, max(lengths))
        out.backward(do)
    finally:
        set_attention_backend("auto")
    # bf16 inputs and outputs; gradients sum over up to 2048 keys. Length-1 sequences have exactly zero
    # query/key gradients, so errors are relative to at least 1 (the scale of the random inputs).
    errs = [rel(out, ref)] + [rel(t.grad, r.grad, floor=1.0) for t, r in zip((q, k, v), ref_in)]
    assert max(errs) <= 2e-2, (errs, lengths)


@pytest.mark.parametrize("lengths", [[1], [37, 1, 200, 5], [512]])
def test_flex_matches_sdpa_reference_in_fp32(lengths):
    """FlexAttention is the one CUDA backend for fp32 inputs (the forward; bf16 is covered above)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    T = sum(lengths)
    q = torch.randn(T, 8, 64, device="cuda", generator=g)
    k, v = (torch.randn(T, 2, 64, device="cuda", generator=g) for _ in range(2))
    cu = cu_seqlens_from_lengths(lengths, device="cuda")
    try:
        set_attention_backend("sdpa")
        ref = varlen_attention(q, k, v, cu, max(lengths))
        set_attention_backend("flex")
        out = varlen_attention(q, k, v, cu, max(lengths))
    finally:
        set_attention_backend("auto")
    assert rel(out, ref) <= 1e-4


def head_case(T: int, V: int, dtype: torch.dtype, seed: int):
    """`(hidden [T, 256], weight [V, 256], labels [T] with ~20% ignored, generator)` of a fused-head test."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = (torch.randn(T, 256, device="cuda", generator=g)).to(dtype).requires_grad_()
    w = (torch.randn(V, 256, device="cuda", generator=g) / 8).to(dtype).requires_grad_()
    y = torch.randint(0, V, (T,), device="cuda", generator=g)
    y[torch.rand(T, device="cuda", generator=g) < 0.2] = IGNORE_INDEX
    return h, w, y, g


def check_grads(pairs, dtype: torch.dtype, tol: float, bf16_tol: float) -> None:
    """fp32: relative error <= `tol`; bf16: Frobenius error <= what rounding the exact gradient to bf16 costs +
    `bf16_tol` (no bf16 tensor is within 1e-3 of fp32 elementwise: one rounding is up to 2^-8)."""
    for got, want in pairs:
        if dtype == torch.float32:
            assert rel(got, want) <= tol, rel(got, want)
        else:
            floor = fro(want.to(dtype), want)
            assert fro(got, want) <= floor + bf16_tol, (fro(got, want), floor, rel(got, want))


@pytest.mark.parametrize("kept", ["none", "half", "all"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,V,chunk", [(300, 5000, 64), (1000, 32000, 1024), (7, 128256, 3)])
def test_fused_logprobs_match_naive_fp32(monkeypatch, dtype, T, V, chunk, kept):
    """`kept`: how many rows' logits are kept from forward to backward (the rest are recomputed)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    h, w, y, g = head_case(T, V, dtype, T)
    g_lp, g_ent = torch.randn(T, device="cuda", generator=g), torch.randn(T, device="cuda", generator=g)
    save_bytes = {"none": 0, "half": (T // 2) * V * (2 if dtype == torch.bfloat16 else 4), "all": 2**40}[kept]
    lp, ent = linear_logprobs_entropy(h, w, y, temperature=0.7, chunk_size=chunk, save_bytes=save_bytes)
    (lp * g_lp + ent * g_ent).sum().backward()

    hr, wr = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref_lp, ref_ent = logprobs_entropy_reference(hr @ wr.t() / 0.7, y)
    valid = y != IGNORE_INDEX
    (ref_lp * g_lp + ref_ent * g_ent).sum().backward()
    # Against naive fp32 on the same (rounded) inputs. Log-probs and entropy are fp32 from fp32 logits
    # (straight from the matmul accumulator): 1e-3 (max error over max value) in bf16, 1e-5 in fp32
    # (summation order on the GPU). Gradients come back in the inputs' dtype, and no bf16 tensor is
    # within 1e-3 of fp32 elementwise (one rounding is up to 2^-8), so in bf16 they are held to 1e-3
    # relative in the Frobenius norm on top of what rounding the exact gradient to bf16 costs (rows kept in fp16
    # relative to their max add ~2e-4 to p's error in this norm).
    tol = 1e-3 if dtype == torch.bfloat16 else 1e-5
    assert rel(lp, ref_lp) <= tol and rel(ent, ref_ent) <= tol, (rel(lp, ref_lp), rel(ent, ref_ent))
    check_grads(((h.grad, hr.grad), (w.grad, wr.grad)), dtype, tol, tol)
    assert bool((lp[~valid] == 0).all() and (ent[~valid] == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,V,chunk,opt", [
    (300, 5000, 64, CrossEntropy()), (1000, 32000, None, CrossEntropy(z_loss=1e-3, label_smoothing=0.1)),
    (7, 128256, 3, CrossEntropy(normalizer=5.0)), (4096, 128256, None, CrossEntropy()),
], ids=["small", "z-loss-smoothing", "short-wide", "llama-vocab"])
def test_fused_loss_matches_naive_fp32(monkeypatch, dtype, T, V, chunk, opt):
    """The fused loss's Triton path against autograd of fp32 `F.cross_entropy` on the same (rounded) inputs. The
    chunk logits are kept in the inputs' dtype (bf16, as a bf16 `lm_head` writes them) and the weight gradient is
    accumulated over chunks in it (Liger's choice; the memory of one fp32 copy saved): in bf16 the loss is held to
    2e-3 and the gradients to 4e-3 in the Frobenius norm above what rounding the exact ones to bf16 costs."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    h, w, y, _ = head_case(T, V, dtype, T)
    loss = linear_cross_entropy(h, w, y, opt, chunk)
    (loss * 1.3).backward()
    hr, wr = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    z = hr @ wr.t()
    valid = y != IGNORE_INDEX
    ref = F.cross_entropy(z, y, reduction="sum", label_smoothing=opt.label_smoothing)
    ref = (ref + opt.z_loss * (z.logsumexp(-1)[valid] ** 2).sum()) / (opt.normalizer or valid.sum())
    (ref * 1.3).backward()
    tol = 2e-3 if dtype == torch.bfloat16 else 1e-5
    assert abs(float(loss - ref)) <= tol * abs(float(ref)), (float(loss), float(ref))
    check_grads(((h.grad, hr.grad), (w.grad, wr.grad)), dtype, tol, 4e-3)


@pytest.mark.parametrize("kept", ["none", "half", "all"])
def test_fused_logprobs_without_entropy_are_the_defaults_bitwise_on_cuda(kept):
    """The Triton kernels' `entropy=False` variants: the default's log-probs and gradients, bit for bit."""
    T, V = 1000, 32000
    h, w, y, g = head_case(T, V, torch.bfloat16, 1)
    up = torch.randn(T, device="cuda", generator=g)
    save_bytes = {"none": 0, "half": (T // 2) * V * 2, "all": 2**40}[kept]
    runs = []
    for entropy in (True, False):
        lp, ent = linear_logprobs_entropy(h, w, y, 0.7, 256, save_bytes=save_bytes, entropy=entropy)
        runs.append((lp.detach(), *torch.autograd.grad((lp * up).sum(), (h, w)), ent))
    assert runs[1][3] is None
    assert all(torch.equal(a, b) for a, b in zip(runs[0][:3], runs[1][:3]))


def test_ops_compile_fullgraph_on_cuda():
    """All three ops in one `torch.compile(fullgraph=True)` (inductor): no graph break."""
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [100, 3, 400]
    cu = cu_seqlens_from_lengths(lengths, device="cuda")
    T = sum(lengths)
    x = torch.randn(T, 512, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(512, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    head = torch.randn(1000, 512, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 1000, (T,), device="cuda", generator=g)

    def f(x, w, head, y):
        h = rms_norm(x, w, 1e-5)
        q = h.view(T, 8, 64)
        a = varlen_attention(q, q[:, :2], q[:, :2], cu, max(lengths)).reshape(T, 512)
        return linear_cross_entropy(a + x, head, y)

    loss = torch.compile(f, fullgraph=True)(x, w, head, y)
    loss.backward()
    grads = [t.grad.clone() for t in (x, w, head)]
    for t in (x, w, head):
        t.grad = None
    ref = f(x, w, head, y)
    ref.backward()
    assert abs(float(loss - ref)) <= 1e-2 * abs(float(ref))
    assert max(rel(a, t.grad) for a, t in zip(grads, (x, w, head))) <= 2e-2


def test_fa4_custom_op_compiles_fullgraph_and_passes_opcheck():
    """FlashAttention-4 enters compiled blocks as `dtllama::fa4_varlen_fwd/bwd`: fake shapes, autograd
    and schema are right (opcheck), and a fullgraph compile gives the eager numbers."""
    from dtllama.ops import _fa4

    why = unavailable_reason("fa4", torch.device("cuda"), torch.bfloat16, 64)
    if why is not None:
        pytest.skip(f"fa4 cannot run here: {why}")
    lengths = torch.randint(1, 700, (5,)).tolist()
    T = sum(lengths)
    q = torch.randn(T, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(T, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    cu = cu_seqlens_from_lengths(lengths, device="cuda")
    torch.library.opcheck(torch.ops.dtllama.fa4_varlen_fwd, (q, k, v, cu, max(lengths)),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))

    def run(fn):
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v, cu, max(lengths))
        out.float().square().sum().backward()
        return [out.detach()] + [t.grad.clone() for t in (q, k, v)]

    eager = run(_fa4.fa4_varlen_attention)
    compiled = run(torch.compile(_fa4.fa4_varlen_attention, fullgraph=True))
    # The same kernels run in both; only the graph around them differs.
    assert max(rel(a, b) for a, b in zip(compiled, eager)) <= 1e-3


def test_compiled_attention_takes_batches_of_any_token_count():
    """Under torch.compile a new token count T retraces with T dynamic; the dense cuDNN path (equal lengths) must
    then come only from shapes that prove it, not from the batch that was traced (the compiled recipe crashed on a
    later batch: a `view` to the traced `[B, S]` of another T). Without FA4 and flash-attn, auto picks cuDNN for
    the equal-length batches here."""
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    f = torch.compile(lambda q, k, v, cu, m: varlen_attention(q, k, v, cu, m))
    for lengths in ([64] * 4, [100] * 3, [37, 200, 5], [128] * 2):
        cu = cu_seqlens_from_lengths(lengths, device="cuda")
        T = sum(lengths)
        q, k, v = (torch.randn(T, h, 64, device="cuda", generator=g, dtype=torch.bfloat16) for h in (8, 2, 2))
        ref = varlen_attention(q, k, v, cu, max(lengths))
        assert fro(f(q, k, v, cu, max(lengths)), ref) <= TOL[torch.bfloat16], lengths
