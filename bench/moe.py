"""Llama 4 MoE on one GPU: the MoE layer's forward + backward by backend, and a reduced-depth Scout training.

    python bench/moe.py                                  # Scout layer shape: 16 experts, top-1, 8192 tokens
    python bench/moe.py --train-layers 4 --steps 6       # also train Scout cut to 4 layers (full width)
    python bench/moe.py --shape tiny --tokens 256 --train-layers 2 --steps 2   # CPU smoke run

1. The MoE block `feed_forward` (router, routed experts, shared expert) at the Scout shape, bf16 on GPU (fp32 on
   CPU), random weights and tokens, forward + backward (median of `--reps` after a warm-up): dtllama with the
   grouped GEMM (`torch._grouped_mm` over expert-sorted tokens), dtllama with a loop over experts, and
   transformers' `Llama4TextMoe` holding the same weights (it runs every expert on every token, scaled by 0
   where unrouted). The routed experts alone are timed too, with their TFLOP/s: 3 matmuls (gate/up and down)
   of `tokens * top_k` rows, forward and backward (18 * rows * hidden * intermediate FLOPs). Each backend's
   output is compared with the loop's.
2. With `--train-layers N`: Scout's width and experts with N layers trains `--steps` AdamW steps on one packed
   batch of `--tokens` random tokens (bf16 parameters and optimizer state: 4 full-width layers and the untied
   embedding and head are 10.9 B parameters, which with fp32 master weights would not fit one GPU); tokens/s and
   MFU from the active parameters (6 x active non-embedding parameters + 12 L d S per token, torchtitan's count)
   at 989 TFLOP/s.
Prints a table and the rows as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

import dtllama  # noqa: E402
from dtllama.models.llama4 import Llama4ForCausalLM, Llama4TextMoe, expert_counts, route, set_moe_backend
from dtllama.ops import cu_seqlens_from_lengths, shift_labels

PEAK_TFLOPS = 989.0


def config_for(shape: str):
    c = dtllama.flavors["llama4-scout"]
    if shape == "tiny":
        c = dataclasses.replace(c, hidden_size=64, intermediate_size=128, intermediate_size_mlp=256,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                                num_local_experts=4, attention_chunk_size=64)
    return c


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


def moe_rows(a, config, device, dtype) -> list[dict]:
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe as HFMoe

    torch.manual_seed(0)
    ours = Llama4TextMoe(config).to(device, dtype)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.02)
    hf = HFMoe(Llama4TextConfig(**config.to_hf())).to(device, dtype)
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(a.tokens, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    experts, scores = route(ours.router(x).detach(), ours.top_k)
    order = torch.argsort(experts.flatten(), stable=True)
    rows_in = (x.detach()[order // ours.top_k] * scores.flatten()[order, None]).requires_grad_()
    counts = expert_counts(experts.flatten(), config.num_local_experts)
    routed_flops = 18 * rows_in.shape[0] * config.hidden_size * config.intermediate_size

    def layer(module):
        out = module(x)[0]
        out.backward(grad)
        return out

    out = {}
    for name, module, backend in (("dtllama grouped", ours, "grouped"), ("dtllama loop", ours, "loop"),
                                  ("transformers", hf, None)):
        if backend:
            set_moe_backend(backend)
        row = {"impl": name, "layer_ms": 1e3 * timed(lambda: layer(module), a.reps, device)}
        if backend:
            expert_s = timed(lambda: ours.experts(rows_in, counts).backward(rows_in.detach()), a.reps, device)
            row.update(experts_ms=1e3 * expert_s, experts_tflops=routed_flops / expert_s / 1e12)
        out[name] = (row, layer(module).detach().float())
    set_moe_backend("auto")
    ref = out["dtllama loop"][1]
    for row, y in out.values():
        row["max_rel_diff_vs_loop"] = float((y - ref).abs().max() / ref.abs().max())
    return [row for row, _ in out.values()]


def train_row(a, config, device, dtype) -> dict:
    config = dataclasses.replace(config, num_hidden_layers=a.train_layers, torch_dtype="bfloat16", moe_layers=None,
                                 no_rope_layers=[])  # the per-layer lists re-derived for the new depth
    with torch.device(device):
        model = Llama4ForCausalLM(config).to(dtype)
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
    active = config.num_params(active=True) - 2 * config.vocab_size * config.hidden_size  # embedding and head
    flops_tok = 6 * active + 12 * config.num_hidden_layers * config.hidden_size * a.tokens
    tok_s = a.tokens / step_s
    return {"impl": f"Scout, {a.train_layers} layers", "params_b": config.num_params() / 1e9, "step_ms": 1e3 * step_s,
            "tok_s": tok_s, "mfu": tok_s * flops_tok / (PEAK_TFLOPS * 1e12), "losses": losses,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["scout", "tiny"], default="scout")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--train-layers", type=int, default=0, help="also train Scout cut to this many layers")
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    config = config_for(a.shape)
    rows = moe_rows(a, config, device, dtype)
    print(f"MoE layer, {a.shape} shape: {config.num_local_experts} experts, top-{config.num_experts_per_tok}, "
          f"hidden {config.hidden_size}, intermediate {config.intermediate_size}, {a.tokens} tokens, {dtype}, "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}")
    print(f"{'impl':<18}{'fwd+bwd ms':>11}{'experts ms':>11}{'TFLOP/s':>9}{'vs loop':>10}")
    for r in rows:
        print(f"{r['impl']:<18}{r['layer_ms']:>11.2f}{r.get('experts_ms', float('nan')):>11.2f}"
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
