"""Benchmark of dtllama's GPU ops against their peers, in one run on one GPU.

    python bench/ops.py [--only rms_norm,attention,logprobs,loss,step] [--json ops.json]

First the ceilings of this device (device-to-device copy bandwidth, bf16 matmul TFLOP/s), then:
- RMSNorm forward+backward, bf16 [32768, 4096]: dtllama's Triton op vs eager HF formula, its
  `torch.compile`, and `F.rms_norm`; bandwidth counts the minimal bytes (x, y, dy, dx).
- varlen attention forward+backward on a packed batch with 50% padding: each backend vs padded SDPA.
- a full Llama-3.2-1B training step (bf16 weights, fused AdamW) on 50% padding: dtllama packed with
  each attention backend vs transformers' padded `[B, S]` SDPA model; real tokens/s and MFU.
- fused log-probs + entropy, bf16 T=16384, hidden 4096, vocab 128256, forward+backward of
  logprob sum + 0.01 * entropy sum: time and peak extra memory (with its default 2 GiB of kept
  logit rows, and with none; `entropy=False`) vs naive log_softmax + gather, eager and compiled.
- the fused SFT loss, bf16 T=16384, vocab 128256, hidden 4096 and 2048, forward + backward of the mean
  cross-entropy: dtllama's `linear_cross_entropy` vs Liger-Kernel's `LigerFusedLinearCrossEntropyLoss`,
  Cut Cross-Entropy and the compiled naive formula (peers that are not installed are listed as such): time,
  peak memory above the inputs (the two gradients included), gradients against fp32 autograd; and the three
  matmuls of one token chunk alone, where the time goes.
Prints a table per section and the whole result as JSON (also written to `--json`).
MFU is against 989 TFLOP/s (H100/H200 dense bf16).
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

PEAK_TFLOPS = 989.0
GiB = 2**30


def bench(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` over `iters` runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def bench_graph(fn, iters: int = 20) -> float:
    """Median milliseconds of `fn()` replayed as a CUDA graph: GPU time alone, without Python launch
    overhead (which a training step hides behind the GPU work queued before it)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay, iters)


def table(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}")
    cols = list(rows[0])
    width = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, width)))
    print(" | ".join("-" * w for w in width))
    for r in rows:
        print(" | ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, width)), flush=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "-" if v is None else str(v)


def ceilings() -> dict:
    x = torch.empty(2**29, dtype=torch.bfloat16, device="cuda").normal_()  # 1 GiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    copy_gbs = 2 * x.nbytes / ms / 1e6
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms = bench(lambda: a @ b)
    tflops = 2 * n**3 / mm_ms / 1e9
    rows = [{"ceiling": "d2d copy (read+write)", "value": copy_gbs, "unit": "GB/s"},
            {"ceiling": f"bf16 matmul {n}^3", "value": tflops, "unit": "TFLOP/s"}]
    table("Ceilings", rows)
    return {"copy_GBps": copy_gbs, "matmul_TFLOPs": tflops}


def rms_norm_bench(copy_gbs: float, rows: int = 32768, hidden: int = 4096) -> list[dict]:
    from dtllama.ops import rms_norm

    def eager(x, w, eps=1e-5):
        h = x.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.rand(hidden, device="cuda") + 0.5).to(torch.bfloat16).requires_grad_()
    dy = torch.randn_like(x)
    ref = eager(x.detach().float(), w.detach().float())
    peers = {
        "dtllama (Triton op)": lambda x, w: rms_norm(x, w, 1e-5),
        "torch.compile(dtllama op)": torch.compile(lambda x, w: rms_norm(x, w, 1e-5)),
        "eager HF formula": eager,
        "torch.compile(eager)": torch.compile(eager),
        "F.rms_norm": lambda x, w: F.rms_norm(x, (hidden,), w, 1e-5),
    }
    nbytes = 5 * x.numel() * x.element_size()  # forward x, y; backward x, dy, dx
    out = []
    for name, f in peers.items():
        def step():
            x.grad = w.grad = None
            f(x, w).backward(dy)

        ms = bench(step, iters=50)
        gpu_ms = bench_graph(step, iters=50)
        err = float((f(x, w).detach().float() - ref).abs().max() / ref.abs().max())
        out.append({"rms_norm bf16 [32768,4096] fwd+bwd": name, "ms": ms, "% of copy": 100 * nbytes / ms / 1e6 / copy_gbs,
                    "GPU ms (graph)": gpu_ms, "GPU % of copy": 100 * nbytes / gpu_ms / 1e6 / copy_gbs,
                    "max rel err vs fp32": err})
    table("RMSNorm", out)
    return out


def _padded_lengths(batch: int, seq: int, seed: int = 0) -> list[int]:
    """`batch` lengths in [1, seq] summing to half of `batch * seq`, one of them `seq` (50% padding)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(batch - 1, generator=g) + 0.05
    rest = batch * seq // 2 - seq
    lengths = (raw / raw.sum() * rest).floor().clamp(1, seq).long().tolist()
    lengths[0] += rest - sum(lengths)
    return [seq] + lengths


def attention_bench(batch: int = 8, seq: int = 2048, hq: int = 32, hkv: int = 8, d: int = 64) -> list[dict]:
    from dtllama.ops import cu_seqlens_from_lengths, cuda_backends, set_attention_backend, varlen_attention

    lengths = _padded_lengths(batch, seq)
    T = sum(lengths)
    cu = cu_seqlens_from_lengths(lengths, device="cuda")
    q, k, v = (torch.randn(T, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (hq, hkv, hkv))
    flops = 3 * sum(2 * 2 * n * n / 2 * hq * d for n in lengths)  # causal, forward + 2x backward
    out = []
    for name in cuda_backends():
        set_attention_backend(name)

        def step():
            varlen_attention(q, k, v, cu, max(lengths)).sum().backward()

        ms = bench(step)
        out.append({"attention fwd+bwd, 50% padding": f"packed {name}", "ms": ms,
                    "real tok/s": T / ms * 1e3, "TFLOP/s": flops / ms / 1e9})
    set_attention_backend("auto")
    # Padded peer, as transformers runs it: [B, H, S, D] with a causal + padding boolean mask.
    mask = torch.zeros(batch, 1, seq, seq, dtype=torch.bool, device="cuda")
    causal = torch.ones(seq, seq, dtype=torch.bool, device="cuda").tril()
    for i, n in enumerate(lengths):
        mask[i, 0, :n, :n] = causal[:n, :n]
        mask[i, 0, n:, 0] = True  # padding rows attend somewhere, as HF's mask does
    pq, pk, pv = (torch.randn(batch, h, seq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                  for h in (hq, hkv, hkv))

    def padded():
        F.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask, enable_gqa=True).sum().backward()

    ms = bench(padded)
    out.append({"attention fwd+bwd, 50% padding": "padded SDPA [B,S] + mask", "ms": ms,
                "real tok/s": T / ms * 1e3, "TFLOP/s": flops / ms / 1e9})
    table(f"Varlen attention (B={batch}, S={seq}, {T} real tokens, Hq={hq}, Hkv={hkv}, D={d})", out)
    return out


def step_bench(batch: int = 8, seq: int = 2048, flavor: str = "llama3.2-1b") -> list[dict]:
    """One full training step (forward, backward, fused AdamW) of Llama-3.2-1B, bf16 weights."""
    import transformers

    import dtllama
    from dtllama.ops import (
        attention_backend, cu_seqlens_from_lengths, cuda_backends, set_attention_backend, shift_labels,
    )

    config = dtllama.flavors[flavor]
    lengths = _padded_lengths(batch, seq, seed=1)
    real = sum(lengths)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g).cuda()
    attn = torch.zeros(batch, seq, dtype=torch.long, device="cuda")
    for i, n in enumerate(lengths):
        attn[i, :n] = 1
    packed_ids = ids[attn.bool()]
    cu = cu_seqlens_from_lengths(lengths, device="cuda")
    labels = shift_labels(packed_ids, cu)
    n_params = config.num_params()
    attn_flops = sum(n * n for n in lengths) * 2 * config.hidden_size * config.num_hidden_layers * 3  # causal
    model_flops = 6 * n_params * real + attn_flops

    torch.manual_seed(0)
    model = dtllama.LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    out = []

    def packed_step():
        o = model(packed_ids, cu_seqlens=cu, max_seqlen=max(lengths), labels=labels)
        (-o.logprobs.sum() / real).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name in cuda_backends():
        set_attention_backend(name)
        torch.cuda.reset_peak_memory_stats()
        ms = bench(packed_step, iters=10)
        out.append({"Llama-3.2-1B step, 50% padding": f"dtllama packed, {name}", "ms": ms,
                    "real tok/s": real / ms * 1e3, "MFU %": 100 * model_flops / ms / 1e9 / PEAK_TFLOPS,
                    "peak GiB": torch.cuda.max_memory_allocated() / GiB})
    set_attention_backend("auto")
    from dtllama.parallel.compile import apply_compile

    apply_compile(model)  # the recipe's --compile: each decoder layer compiled with fullgraph=True
    torch.cuda.reset_peak_memory_stats()
    ms = bench(packed_step, iters=10)
    out.append({"Llama-3.2-1B step, 50% padding": f"dtllama packed, {attention_backend(torch.device('cuda'))}, "
                "compiled layers", "ms": ms, "real tok/s": real / ms * 1e3,
                "MFU %": 100 * model_flops / ms / 1e9 / PEAK_TFLOPS, "peak GiB": torch.cuda.max_memory_allocated() / GiB})
    del model, opt
    torch.cuda.empty_cache()

    with torch.device("cuda"):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf())).to(torch.bfloat16)
    hf.config._attn_implementation = "sdpa"
    hf_labels = ids.masked_fill(attn == 0, -100)
    hopt = torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=True)

    def padded_step():
        hf(input_ids=ids, attention_mask=attn, labels=hf_labels).loss.backward()
        hopt.step()
        hopt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    ms = bench(padded_step, iters=10)
    out.append({"Llama-3.2-1B step, 50% padding": "transformers padded [B,S], sdpa", "ms": ms,
                "real tok/s": real / ms * 1e3, "MFU %": 100 * model_flops / ms / 1e9 / PEAK_TFLOPS,
                "peak GiB": torch.cuda.max_memory_allocated() / GiB})
    base = out[-1]["real tok/s"]
    for r in out:
        r["vs padded"] = r["real tok/s"] / base
    table(f"Training step (B={batch}, S={seq}, {real} real tokens of {batch * seq})", out)
    del hf, hopt
    torch.cuda.empty_cache()
    return out


def _head_inputs(T: int, hidden: int, vocab: int, ignored: float = 0.0):
    """bf16 `(hidden states, head weight, labels)` of a head benchmark (`ignored`: the fraction of labels -100)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(T, hidden, device="cuda", generator=g) * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) / math.sqrt(hidden)).to(torch.bfloat16)
    y = torch.randint(0, vocab, (T,), device="cuda", generator=g)
    if ignored:
        y[torch.rand(T, device="cuda", generator=g) < ignored] = -100
    return h, w.requires_grad_(), y


def _peak(fn):
    """`(fn(), peak GiB above the memory allocated before, GiB still allocated after)` of one call."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, (torch.cuda.max_memory_allocated() - before) / GiB, (torch.cuda.memory_allocated() - before) / GiB


def logprobs_bench(T: int = 16384, hidden: int = 4096, vocab: int = 128256) -> list[dict]:
    from dtllama.ops import linear_logprobs_entropy

    h, w, y = _head_inputs(T, hidden, vocab)

    def naive(h, w, y):
        logp = torch.log_softmax((h @ w.t()).float(), -1)
        return logp.gather(1, y[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)

    peers = {"dtllama fused (default: 2 GiB of rows kept)": lambda h, w, y: linear_logprobs_entropy(h, w, y),
             "dtllama fused, every row recomputed": lambda h, w, y: linear_logprobs_entropy(h, w, y, save_bytes=0),
             "dtllama fused, 0.5 GiB of rows kept": lambda h, w, y: linear_logprobs_entropy(h, w, y,
                                                                                            save_bytes=GiB // 2),
             "dtllama fused, entropy=False": lambda h, w, y: linear_logprobs_entropy(h, w, y, entropy=False),
             "dtllama fused, entropy=False, every row recomputed": lambda h, w, y: linear_logprobs_entropy(
                 h, w, y, save_bytes=0, entropy=False),
             "naive log_softmax": naive,
             "torch.compile(naive)": torch.compile(naive)}
    flops = 3 * 2 * T * hidden * vocab  # forward, d_hidden, d_weight (recompute is not useful work)
    grads = (h.numel() + w.numel()) * 2
    out = []
    for name, f in peers.items():
        def step():
            h.grad = w.grad = None
            lp, ent = f(h, w, y)
            (lp.sum() if ent is None else lp.sum() + 0.01 * ent.sum()).backward()

        try:
            ms = bench(step, iters=9, warmup=2)
            h.grad = w.grad = None
            extra = _peak(step)[1] - grads / GiB
        except torch.OutOfMemoryError:
            ms, extra = float("nan"), float("nan")
        out.append({"log-probs+entropy bf16 T=16384 H=4096 V=128256": name, "ms": ms,
                    "matmul TFLOP/s": flops / ms / 1e9, "peak extra GiB": extra,
                    "peak extra MiB": f"{extra * 1024:.2f}"})  # to show what entropy=False saves (KiB)
        torch.cuda.empty_cache()
    table("Fused linear log-probs + entropy (forward + backward)", out)
    return out


def _loss_peers(hidden: int) -> dict:
    """The SFT loss heads to compare: `f(h, w, y) -> mean cross-entropy`, or the reason a peer is missing."""
    from dtllama.ops import linear_cross_entropy

    def naive(h, w, y):
        return F.cross_entropy((h @ w.t()).float(), y)

    peers = {"dtllama linear_cross_entropy (default chunk)": lambda h, w, y: linear_cross_entropy(h, w, y),
             "dtllama, chunk 1024": lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=1024),
             "dtllama, chunk 2048": lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=2048)}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        peers["Liger-Kernel LigerFusedLinearCrossEntropyLoss"] = lambda h, w, y: liger(w, h, y)
    except ImportError as e:
        peers["Liger-Kernel LigerFusedLinearCrossEntropyLoss"] = f"not installed ({e})"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        peers["Cut Cross-Entropy"] = lambda h, w, y: cce(h, w, y)
    except ImportError as e:
        peers["Cut Cross-Entropy"] = f"not installed ({e})"
    peers["naive F.cross_entropy"] = naive
    peers["torch.compile(naive)"] = torch.compile(naive)
    return peers


def loss_bench(T: int = 16384, vocab: int = 128256) -> list[dict]:
    """Forward + backward of the mean next-token cross-entropy from bf16 hidden states, each peer in turn."""
    out = []
    for hidden in (4096, 2048):
        h, w, y = _head_inputs(T, hidden, vocab, ignored=0.1)
        h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        F.cross_entropy(h32 @ w32.t(), y).backward()
        ref = (h32.grad, w32.grad)
        del h32, w32
        torch.cuda.empty_cache()
        flops = 3 * 2 * T * hidden * vocab
        key = f"SFT loss bf16 T={T} V={vocab} H={hidden}"
        for name, f in _loss_peers(hidden).items():
            if isinstance(f, str):
                out.append({key: name, "ms": None, "matmul TFLOP/s": None, "peak extra GiB": None, "note": f})
                continue

            def step():
                h.grad = w.grad = None
                f(h, w, y).backward()

            try:
                ms = bench(step, iters=5, warmup=2)
                h.grad = w.grad = None
                loss, fwd_peak, held = _peak(lambda: f(h, w, y))
                _, bwd_peak, _ = _peak(loss.backward)  # above what forward left allocated
                del loss
                extra = max(fwd_peak, held + bwd_peak)
                err = max(float((a.grad.float() - b).norm() / b.norm()) for a, b in ((h, ref[0]), (w, ref[1])))
                note = (f"grad rel. err (L2) vs fp32 {err:.2e}; forward peak {fwd_peak:.2f} GiB, "
                        f"{held:.2f} GiB held for backward")
            except torch.OutOfMemoryError:
                ms, extra, note = float("nan"), float("nan"), "out of memory"
            out.append({key: name, "ms": ms, "matmul TFLOP/s": flops / ms / 1e9, "peak extra GiB": extra,
                        "note": note})
            h.grad = w.grad = None
            torch.cuda.empty_cache()
        out.extend(_chunk_gemms(h.detach(), w.detach(), key))
    table("Fused SFT loss (forward + backward; peak extra = above the inputs, gradients included)", out)
    return out


def _chunk_gemms(h: torch.Tensor, w: torch.Tensor, key: str) -> list[dict]:
    """The three matmuls of one token chunk of the fused loss, each alone, times the chunks of T: the floor of the
    fused loss at that chunk size (logits; d_hidden; d_weight accumulated in place)."""
    from dtllama.ops.cross_entropy import default_chunk

    T, H = h.shape
    V = w.shape[0]
    rows = []
    for C in sorted({default_chunk(T, V, H), 1024, 2048}):
        z = torch.empty(C, V, device="cuda", dtype=h.dtype)
        dw = torch.zeros_like(w)
        dh = torch.empty(C, H, device="cuda", dtype=h.dtype)
        hc = h[:C]
        parts = {"logits": lambda: torch.mm(hc, w.t(), out=z), "d_hidden": lambda: torch.mm(z, w, out=dh),
                 "d_weight += ": lambda: dw.addmm_(z.t(), hc)}
        for part, fn in parts.items():
            ms = bench(fn, iters=10) * (T // C)
            rows.append({key: f"chunk {C}: {part} matmul x {T // C}", "ms": ms,
                         "matmul TFLOP/s": 2 * T * H * V / ms / 1e9, "peak extra GiB": None, "note": "floor"})
        del z, dw, dh
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="rms_norm,attention,logprobs,loss,step",
                        help="sections to run (the ceilings always run: the others are reported against them)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/ops.py measures GPU kernels: no CUDA device here")
    only = set(args.only.split(","))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    res["ceilings"] = ceilings()
    copy = res["ceilings"]["copy_GBps"]
    sections = {"rms_norm": lambda: rms_norm_bench(copy), "attention": attention_bench,
                "logprobs": logprobs_bench, "loss": loss_bench, "step": step_bench}
    for name, fn in sections.items():
        if name in only:
            res[name] = fn()
    print("\nJSON " + json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
