"""The Hugging Face adapter's training step side by side: transformers + FSDP2 (its own SDPA attention, padded
batches), dtllama's adapter on the same transformers modules (packed, its attention and fused head), dtllama's
native family of the same shape.

    python bench/hf.py [--shape qwen3-1.7b] [--batch 8] [--seq 2048] [--fill 0.5] [--steps 8] [--warmup 3]
        [--impls hf,adapter,native] [--compile] [--json out.json]

One GPU, one process: each implementation in turn is built on meta, sharded by FSDP2 (bf16 parameters, fp32
reduce; dtllama's through `parallelize`), materialized, and loaded with the native model's init (one HF-named state
for all three, so their first losses agree within bf16 noise). Every step sees the same B sequences of random
tokens whose lengths fill `--fill` of the `[B, S]` rows (0.5: half of transformers' batch is padding); the loss is
the next-token cross entropy summed over real tokens / their count, fused AdamW. Throughput counts real tokens
only; MFU is torchtitan's FLOP count of the real tokens at 989 TFLOP/s. Prints a table and the rows as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import PEAK_TFLOPS, full_state, load_full  # noqa: E402  (bench/train.py: HF-named state in and out)


def lengths_for(a) -> list[int]:
    """B lengths in [S/8, S] whose sum is `fill` of B*S (deterministic)."""
    g = torch.Generator().manual_seed(0)
    target = int(a.fill * a.batch * a.seq)
    lo = max(2, a.seq // 8)
    lengths = torch.randint(lo, a.seq + 1, (a.batch,), generator=g).tolist()
    scale = target / sum(lengths)
    return [max(2, min(a.seq, round(n * scale))) for n in lengths]


def batches(a, vocab: int, lengths: list[int], device):
    g = torch.Generator().manual_seed(1)
    return [[torch.randint(0, vocab, (n,), generator=g).to(device) for n in lengths]
            for _ in range(a.warmup + a.steps)]


def native_config(a):
    import dtllama

    return dtllama.flavors[a.shape]


def build_native(a, device, state):
    import dtllama

    return _dtllama_model(dtllama.model_class(native_config(a)), native_config(a), a, device, state)


def build_adapter(a, device, state):
    from dtllama.models.hf import HFCausalLM, HFConfig

    return _dtllama_model(HFCausalLM, HFConfig(hf_config(a)), a, device, state)


def _dtllama_model(cls, config, a, device, state):
    from dtllama.ops import cu_seqlens_from_lengths, shift_labels
    from dtllama.parallel import FSDPOptions, ParallelDims, parallelize

    dims = ParallelDims(dp_shard=-1).resolve(1, config)
    dims.build_mesh(device.type)
    with torch.device("meta"):
        model = cls(config)
    parallelize(model, dims, fsdp=FSDPOptions(param_dtype=torch.bfloat16), compile=a.compile)
    model.to_empty(device=device)
    if state is None:
        model.init_weights(0)
    else:
        load_full(model, state)
        model.reset_buffers()

    def step(seqs):
        lengths = [len(s) for s in seqs]
        ids = torch.cat(seqs)
        cu = cu_seqlens_from_lengths(lengths, device=device)
        labels = shift_labels(ids, cu)
        out = model(ids, cu_seqlens=cu, max_seqlen=max(lengths), labels=labels)
        loss = -out.logprobs.sum() / (ids.numel() - len(seqs))
        loss.backward()
        return loss

    return model, step


def hf_config(a):
    import transformers

    d = native_config(a).to_hf()
    d.pop("architectures", None)
    return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


def build_hf(a, device, state):
    """transformers' causal LM (SDPA, padded `[B, S]` + attention mask) with FSDP2 per layer + root."""
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cfg = hf_config(a)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    mesh = init_device_mesh(device.type, (1,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        if a.compile:
            layer.compile()
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    model.to_empty(device=device)
    with torch.device(device):  # its inv_freq buffer was built on meta
        model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
    load_full(model, state)

    def step(seqs):
        B, S = len(seqs), max(len(s) for s in seqs)
        ids = torch.zeros(B, S, dtype=torch.long, device=device)
        mask = torch.zeros(B, S, dtype=torch.long, device=device)
        for b, s in enumerate(seqs):  # right padding, as a padded trainer batch
            ids[b, :len(s)], mask[b, :len(s)] = s, 1
        labels = torch.where(mask.bool(), ids, -100)
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum",
                                                 ignore_index=-100) / (labels != -100).sum()
        del logits
        loss.backward()
        return loss

    return model, step


BUILDERS = {"hf": build_hf, "adapter": build_adapter, "native": build_native}
LABELS = {"hf": "transformers + FSDP2 (SDPA, padded)", "adapter": "dtllama HF adapter (packed)",
          "native": "dtllama native"}


def run(impl: str, a, device, state, data, flops: float, real: int) -> tuple[dict, dict | None]:
    from dtllama.ops.attention import attention_backend

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model, step = BUILDERS[impl](a, device, state)
    init = full_state(model) if state is None else None
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, fused=cuda)
    times, losses = [], []
    for i, seqs in enumerate(data):
        sync()
        t0 = time.perf_counter()
        loss = step(seqs)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    sec = statistics.median(times)
    row = {"impl": impl, "what": LABELS[impl], "step_ms": sec * 1e3, "real_tokens_per_s": real / sec,
           "mfu": flops / sec / (PEAK_TFLOPS * 1e12), "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
           "first_loss": losses[0], "last_loss": losses[-1],
           "attention": "sdpa (padded)" if impl == "hf" else attention_backend(device)}
    del model, opt, step
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row, init


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-1.7b", help="a dtllama flavor with a native family")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--fill", type=float, default=0.5, help="real tokens / (batch * seq)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--impls", default="native,adapter,hf")
    p.add_argument("--compile", action="store_true", help="compile each decoder layer (all three)")
    p.add_argument("--json")
    a = p.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    cuda = torch.cuda.is_available()  # the host runs it too (a smoke test: --shape qwen3-debug)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    from dtllama.train.metrics import step_flops

    config = native_config(a)
    lengths = lengths_for(a)
    real = sum(lengths)
    data = batches(a, config.vocab_size, lengths, device)
    flops = step_flops(config, lengths)
    impls = a.impls.split(",")
    if impls[0] != "native":  # the native model writes the init the others load
        impls = ["native", *[i for i in impls if i != "native"]]
    rows, state = [], None
    for impl in impls:
        row, init = run(impl, a, device, state, data, flops, real)
        state = init if state is None else state
        rows.append(row)
    base = {r["impl"]: r for r in rows}
    print(f"\n{a.shape}: {a.batch} sequences, {real} real tokens in [{a.batch}, {a.seq}] "
          f"({100 * real / (a.batch * a.seq):.0f}% filled), bf16, one GPU{', layers compiled' if a.compile else ''}")
    print(f"{'implementation':38} {'ms/step':>8} {'real tok/s':>11} {'MFU':>6} {'peak GiB':>9} "
          f"{'loss 1':>8} {'vs hf':>6} {'vs native':>9}  attention")
    for r in rows:
        vs_hf = r["real_tokens_per_s"] / base["hf"]["real_tokens_per_s"] if "hf" in base else float("nan")
        vs_native = r["real_tokens_per_s"] / base["native"]["real_tokens_per_s"]
        r.update(vs_hf=vs_hf, vs_native=vs_native)
        print(f"{r['what']:38} {r['step_ms']:8.1f} {r['real_tokens_per_s']:11.0f} {100 * r['mfu']:5.1f}% "
              f"{r['peak_gib']:9.2f} {r['first_loss']:8.4f} {vs_hf:5.2f}x {vs_native:8.2f}x  {r['attention']}")
    print(json.dumps(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
