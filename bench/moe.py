"""MoE on one GPU, Llama 4 Scout or Qwen3-30B-A3B (`--family`): the MoE block's forward + backward by backend, and
a reduced-depth training of the full-width model.

    python bench/moe.py                                  # Scout layer shape: 16 experts, top-1, 8192 tokens
    python bench/moe.py --train-layers 4 --steps 6       # also train Scout cut to 4 layers (full width)
    python bench/moe.py --family qwen3                   # Qwen3-30B-A3B layer shape: 128 experts, top-8, 8192 tokens
    python bench/moe.py --family qwen3 --train-layers 4 --steps 6   # also train Qwen3-30B-A3B cut to 4 layers
    python bench/moe.py --shape tiny --tokens 256 --train-layers 2 --steps 2   # CPU smoke run (either family)

1. The MoE block at the family's shape, bf16 on GPU (fp32 on CPU), random weights and tokens, forward + backward
   (median of `--reps` after a warm-up): dtllama with the grouped GEMM (`torch._grouped_mm` over expert-sorted
   tokens), dtllama with a loop over experts, and transformers' block holding the same weights. Llama 4: the
   `feed_forward` (router, routed experts, shared expert) against `Llama4TextMoe` (which runs every expert on every
   token, scaled by 0 where unrouted); Scout is 16 experts, top-1, hidden 5120, intermediate 8192. Qwen3: the
   sparse `mlp` (softmax router, top-k renormalized, routed experts, no shared expert) against
   `Qwen3MoeSparseMoeBlock` (a loop over the experts hit); Qwen3-30B-A3B is 128 experts, top-8, hidden 2048, expert
   intermediate 768. The routed experts alone are timed too, with their TFLOP/s: 3 matmuls (gate/up and down) of
   `tokens * top_k` rows sorted by expert (Llama 4 scales them by their router scores before the experts; Qwen3
   scales the outputs, so its rows go in unscaled), forward and backward (18 * rows * hidden * intermediate
   FLOPs). Each backend's output is compared with the loop's (max relative difference).
2. With `--train-layers N`: the family's full width and experts with N layers trains `--steps` AdamW steps on one
   packed batch of `--tokens` random tokens (bf16 parameters and optimizer state: 4 full-width Scout layers and the
   untied embedding and head are 10.9 B parameters, which with fp32 master weights would not fit one GPU; 4
   Qwen3-30B-A3B layers are 3.1 B); tokens/s and MFU from the active parameters (6 x active non-embedding
   parameters + 12 L (heads x head_dim) S per token, torchtitan's count) at 989 TFLOP/s. The loss is the LM loss
   alone (no load-balance term).
`--shape tiny` shrinks either family for CPU runs (Scout to 4 experts of hidden 64; Qwen3 to the `qwen3-moe-debug`
flavor: 8 experts, top-2, hidden 64, expert intermediate 32, a dense first layer).
Prints a table and the rows as JSON (each row names its `family`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

import dtllama  # noqa: E402
from dtllama.models.llama4 import Llama4ForCausalLM, Llama4TextMoe, route
from dtllama.models.moe import expert_counts, set_moe_backend
from dtllama.models.qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeSparseMoeBlock
from dtllama.ops import cu_seqlens_from_lengths, shift_labels

PEAK_TFLOPS = 989.0


FAMILIES = {  # family: (flavor, the label of its rows, its causal LM)
    "llama4": ("llama4-scout", "Scout", Llama4ForCausalLM),
    "qwen3": ("qwen3-30b-a3b", "Qwen3-30B-A3B", Qwen3MoeForCausalLM),
}


def config_for(family: str, shape: str):
    c = dtllama.flavors[FAMILIES[family][0]]
    if shape == "tiny" and family == "llama4":
        c = dataclasses.replace(c, hidden_size=64, intermediate_size=128, intermediate_size_mlp=256,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                                num_local_experts=4, attention_chunk_size=64)
    elif shape == "tiny":  # 8 experts, top-2, hidden 64, expert intermediate 32 (grouped-GEMM aligned), layer 0 dense
        c = dtllama.flavors["qwen3-moe-debug"]
    return c


def intermediate(config) -> int:
    """Each routed expert's SwiGLU width."""
    return getattr(config, "moe_intermediate_size", None) or config.intermediate_size


def timed(fn, reps: int, device) -> float:
    """Median seconds of `fn()` over `reps` runs after one warm-up."""
    times = []
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def blocks(family: str, config, device, dtype):
    """`(ours, transformers' block with the same weights, ours(x) -> [T, H], hf(x) -> [T, H], routed(x) -> the
    routed rows sorted by expert, as the experts module takes them, and their per-expert counts)`."""
    if family == "llama4":
        from transformers import Llama4TextConfig as HFConfig
        from transformers.models.llama4.modeling_llama4 import Llama4TextMoe as HFMoe
        ours_class = Llama4TextMoe
    else:
        from transformers import Qwen3MoeConfig as HFConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as HFMoe
        ours_class = Qwen3MoeSparseMoeBlock
    torch.manual_seed(0)
    ours = ours_class(config).to(device, dtype)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.02)
    hf_config = HFConfig(**{k: v for k, v in config.to_hf().items() if k != "architectures"})
    hf_config._experts_implementation = "eager"  # transformers' own loop (Qwen3; a standalone block has it unset)
    hf = HFMoe(hf_config).to(device, dtype)
    hf.load_state_dict(ours.state_dict())
    k = config.num_experts_per_tok

    def routed(x):
        if family == "llama4":  # sigmoid scores, applied to the expert inputs
            experts, scores = route(ours.router(x).detach(), k)
        else:  # the top-k of the softmax is the top-k of the logits; the weights scale the outputs
            experts, scores = torch.topk(ours.gate(x).detach(), k, dim=-1).indices, None
        order = torch.argsort(experts.flatten(), stable=True)
        rows = x.detach()[order // k]
        if scores is not None:
            rows = rows * scores.flatten()[order, None]
        return rows.requires_grad_(), expert_counts(experts.flatten(), config.num_local_experts)

    if family == "llama4":
        return ours, hf, lambda x: ours(x)[0], lambda x: hf(x)[0], routed
    return ours, hf, lambda x: ours(x)[0], lambda x: hf(x.unsqueeze(0)).squeeze(0), routed


def _hf_has_grouped_mm() -> bool:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    return "grouped_mm" in ALL_EXPERTS_FUNCTIONS


def moe_rows(a, config, device, dtype) -> list[dict]:
    ours, hf, run_ours, run_hf, routed = blocks(a.family, config, device, dtype)
    x = torch.randn(a.tokens, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    rows_in, counts = routed(x)
    routed_flops = 18 * rows_in.shape[0] * config.hidden_size * intermediate(config)

    def layer(run):
        out = run(x)
        out.backward(grad)
        return out

    out = {}
    impls = [("dtllama grouped", run_ours, "grouped"), ("dtllama loop", run_ours, "loop"), ("transformers", run_hf, None)]
    # transformers' own grouped-GEMM experts (its `experts_implementation="grouped_mm"`), where its block has them
    hf_grouped = a.family == "qwen3" and device.type == "cuda" and _hf_has_grouped_mm()
    if hf_grouped:
        impls.append(("transformers grouped_mm", run_hf, "hf:grouped_mm"))
    for name, run, backend in impls:
        if backend and backend.startswith("hf:"):
            hf.experts.config._experts_implementation = backend[3:]
            backend = None
        elif backend:
            set_moe_backend(backend)
        row = {"family": a.family, "impl": name, "layer_ms": 1e3 * timed(lambda: layer(run), a.reps, device)}
        if backend:
            expert_s = timed(lambda: ours.experts(rows_in, counts).backward(rows_in.detach()), a.reps, device)
            row.update(experts_ms=1e3 * expert_s, experts_tflops=routed_flops / expert_s / 1e12)
        out[name] = (row, layer(run).detach().float())
    set_moe_backend("auto")
    ref = out["dtllama loop"][1]
    for row, y in out.values():
        row["max_rel_diff_vs_loop"] = float((y - ref).abs().max() / ref.abs().max())
    return [row for row, _ in out.values()]


def train_row(a, config, device, dtype) -> dict:
    _, label, model_class = FAMILIES[a.family]
    # Llama 4's per-layer lists are fields, re-derived for the new depth when unset; Qwen3's `moe_layers` is derived
    relayer = {"moe_layers": None, "no_rope_layers": []} if a.family == "llama4" else {}
    config = dataclasses.replace(config, num_hidden_layers=a.train_layers, torch_dtype="bfloat16", **relayer)
    with torch.device(device):
        model = model_class(config).to(dtype)
    with torch.no_grad():  # on the device: the layout-independent host init would take minutes at this size
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else torch.nn.init.normal_(p, std=0.02)
    model.reset_buffers()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (a.tokens,), generator=g).to(device)
    cu = cu_seqlens_from_lengths([a.tokens], device=device)
    labels = shift_labels(ids, cu)
    losses = []

    def step():
        loss = -model(ids, cu_seqlens=cu, max_seqlen=a.tokens, labels=labels).logprobs.sum() / (a.tokens - 1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s = timed(step, a.steps, device)
    embedding = (1 if config.tie_word_embeddings else 2) * config.vocab_size * config.hidden_size  # and head
    active = config.num_params(active=True) - embedding
    attention_width = config.num_attention_heads * config.head_dim  # Scout: the hidden size; Qwen3: twice it
    flops_tok = 6 * active + 12 * config.num_hidden_layers * attention_width * a.tokens
    tok_s = a.tokens / step_s
    return {"family": a.family, "impl": f"{label}, {a.train_layers} layers", "params_b": config.num_params() / 1e9,
            "step_ms": 1e3 * step_s, "tok_s": tok_s, "mfu": tok_s * flops_tok / (PEAK_TFLOPS * 1e12), "losses": losses,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), default="llama4",
                   help="llama4 (Scout) or qwen3 (Qwen3-30B-A3B)")
    p.add_argument("--shape", choices=["full", "scout", "tiny"], default="full",
                   help="full: the family's real layer shape ('scout' names it for llama4); tiny: for CPU runs")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--train-layers", type=int, default=0,
                   help="also train the family's model (full width) cut to this many layers")
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args(argv)
    if a.shape == "scout" and a.family != "llama4":
        p.error("--shape scout is Llama 4's; use --shape full for the family's own")
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    config = config_for(a.family, a.shape)
    rows = moe_rows(a, config, device, dtype)
    shape = FAMILIES[a.family][1] if a.shape != "tiny" else "tiny"
    print(f"{a.family} MoE layer, {shape} shape: {config.num_local_experts} experts, "
          f"top-{config.num_experts_per_tok}, hidden {config.hidden_size}, intermediate {intermediate(config)}, "
          f"{a.tokens} tokens, {dtype}, {torch.cuda.get_device_name() if cuda else 'cpu'}")
    print(f"{'impl':<25}{'fwd+bwd ms':>11}{'experts ms':>11}{'TFLOP/s':>9}{'vs loop':>10}")
    for r in rows:
        print(f"{r['impl']:<25}{r['layer_ms']:>11.2f}{r.get('experts_ms', float('nan')):>11.2f}"
              f"{r.get('experts_tflops', float('nan')):>9.1f}{r['max_rel_diff_vs_loop']:>10.1e}")
    if a.train_layers:
        t = train_row(a, config, device, dtype)
        rows.append(t)
        peak = "-" if t["peak_gib"] is None else f"{t['peak_gib']:.1f} GiB"
        print(f"{t['impl']} ({t['params_b']:.1f} B params), {a.tokens} tokens/step: {t['step_ms']:.0f} ms, "
              f"{t['tok_s']:,.0f} tokens/s, MFU {t['mfu']:.1%} (active parameters), peak {peak}, "
              f"losses {[round(x, 4) for x in t['losses']]}")
    print("JSON " + json.dumps(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
