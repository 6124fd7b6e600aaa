"""Training throughput side by side: dtllama vs torchtitan vs transformers + FSDP2, same shape, batch, init.

    python bench/train.py --nproc 1 --shape 1b --batch 4 --seq 4096 --compile [--ac selective]
        [--impls dtllama,titan,hf,dtllama-fsdp1,dtllama-recompute] [--steps 10] [--warmup 4] [--loss-steps 20]
        [--json out.json]

Each implementation runs in its own `torchrun` (so memory and compile caches do not leak between
them) with the method of the shared side-by-side script: built on meta, its own parallelize (FSDP2
over all ranks, bf16 params, fp32 reduce; torchtitan on one GPU autocasts instead, as its trainer
does), materialized on the GPU, fused AdamW, B full sequences of S random tokens per rank,
next-token loss summed / token count, median step time after warm-up, MFU at 989 TFLOP/s with
torchtitan's FLOP count (6 x non-embedding params + 12 L d S per token), peak allocated memory.

All three start from dtllama's init (written once as an HF-named state dict; torchtitan reads it
through its own HF adapter) and see the same batches, so their losses must agree within bf16 noise
over `--loss-steps` steps: the table says the largest relative difference to dtllama's.
Prints a table and the rows as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

SHAPES = {  # dim, layers, heads, kv heads, ffn, vocab: Llama-3.2-1B (untied) and Llama-3.1-8B
    "1b": (2048, 16, 32, 8, 8192, 128256),
    "8b": (4096, 32, 32, 8, 14336, 128256),
    "3b": (3072, 28, 24, 8, 8192, 128256),
    "tiny": (256, 4, 8, 2, 512, 2048),
}
PEAK_TFLOPS = 989.0
BF16_LOSS_TOL = 2e-2  # bf16 compute (8 mantissa bits) in three codebases, 20 AdamW steps apart


def dtllama_config(shape: str):
    import dtllama

    dim, L, H, KV, F, V = SHAPES[shape]
    return dataclasses.replace(dtllama.flavors["llama3.1-8b"], hidden_size=dim, num_hidden_layers=L,
                               num_attention_heads=H, num_key_value_heads=KV, intermediate_size=F, vocab_size=V,
                               tie_word_embeddings=False, head_dim=dim // H)


def full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    from dtllama.models.llama import hf_name

    return {hf_name(n): (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu()
            for n, p in model.named_parameters()}


def load_full(model, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into a (possibly FSDP-sharded) model, keyed by names without wrapper prefixes
    (activation checkpointing, compile): each rank keeps its slice."""
    from dtllama.models.llama import copy_full_into, hf_name

    with torch.no_grad():
        for n, p in model.named_parameters():
            copy_full_into(p, state[hf_name(n)].to(p.dtype))


# `--impls dtllama-<variant>`: dtllama with one of its speed-ups taken out (or a head swapped in), to measure what
# each is worth.
ABLATIONS = {
    "fsdp1": "FSDP2 on a one-rank mesh for mixed precision, in place of casts at use",
    "recompute": "every logit row recomputed in the head's backward (no kept rows)",
    "loss": "the fused SFT loss head (`loss=CrossEntropy`, gradients made in forward) for the log-prob head",
    "f8convert": "with --float8: torchao's conversion applied by the benchmark (every linear but the head, as the "
                 "shared side-by-side script does) in place of parallelize's float8 option",
}


def convert_float8(model, recipe: str, skip: str) -> None:
    """torchao's float8 conversion of every linear whose name lacks `skip` (the output head), as a benchmark
    applies it from outside: what torchtitan gets here, and dtllama's `f8convert` variant."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=lambda m, fqn: skip not in fqn)


def build_dtllama(a, world, device):
    import dtllama
    from dtllama.ops import CrossEntropy, cu_seqlens_from_lengths, shift_labels
    from dtllama.parallel import Float8Options, FSDPOptions, ParallelDims, apply_fsdp, parallelize

    variant = a.impl.partition("-")[2]
    cfg = dtllama_config(a.shape)
    dims = ParallelDims(dp_shard=-1).resolve(world, cfg)
    dims.build_mesh(device.type)
    with torch.device("meta"):
        model = dtllama.LlamaForCausalLM(cfg)
    mp = FSDPOptions(param_dtype=torch.bfloat16)
    float8 = Float8Options(a.float8) if a.float8 and variant != "f8convert" else None
    if a.float8 and variant == "f8convert":
        convert_float8(model, a.float8, "lm_head")
    if variant == "fsdp1" and world == 1:  # parallelize applies the rest (compile, AC); FSDP goes last, as there
        parallelize(model, dims, ac=a.ac, compile=a.compile, float8=float8)
        apply_fsdp(model, dims.mesh("fsdp"), mp)
    else:
        parallelize(model, dims, ac=a.ac, compile=a.compile, fsdp=mp, float8=float8)
    model.to_empty(device=device)
    model.init_weights(0)
    if a.init:
        state = full_state(model)
        if dist.get_rank() == 0:
            torch.save(state, a.init + ".tmp")
            os.replace(a.init + ".tmp", a.init)

    def step(ids):
        B, S = ids.shape
        flat = ids.reshape(-1)
        cu = cu_seqlens_from_lengths([S] * B, device=device)
        save_bytes = 0 if variant == "recompute" else None  # the ablation recomputes every logit row
        if variant == "loss":
            loss = model(flat, cu_seqlens=cu, max_seqlen=S, labels=shift_labels(flat, cu),
                         loss=CrossEntropy(normalizer=B * (S - 1))).loss
        else:
            out = model(flat, cu_seqlens=cu, max_seqlen=S, labels=shift_labels(flat, cu), save_bytes=save_bytes)
            loss = -out.logprobs.sum() / (B * (S - 1))
        loss.backward()
        return loss

    return model, step


def build_titan(a, world, device):
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.config import JobConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.utils import maybe_enable_amp
    from torchtitan.models.llama3.infra.parallelize import parallelize_llama
    from torchtitan.models.llama3.model.args import TransformerModelArgs
    from torchtitan.models.llama3.model.model import Transformer
    from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter

    dim, L, H, KV, F, V = SHAPES[a.shape]
    mult = 1.0 if dim == 3072 else {8192: 1.5, 14336: 1.3, 512: None}[F]
    args = TransformerModelArgs(dim=dim, n_layers=L, n_heads=H, n_kv_heads=KV, vocab_size=V, rope_theta=500000,
                                ffn_dim_multiplier=mult, multiple_of=1024 if F == 14336 else 256, max_seq_len=a.seq)
    jc = JobConfig()
    jc.training.seq_len = a.seq
    jc.activation_checkpoint.mode = a.ac
    jc.activation_checkpoint.selective_ac_option = "op"
    jc.compile.enable = a.compile
    jc.parallelism.data_parallel_shard_degree = world
    pd = ParallelDims(dp_shard=world, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=world)
    with torch.device("meta"):
        model = Transformer(args)
    if a.float8:
        convert_float8(model, a.float8, "output")
    parallelize_llama(model, pd, jc)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    if a.init:
        load_full(model, Llama3StateDictAdapter(args, None).from_hf(torch.load(a.init)))
    loss_fn = torch.compile(cross_entropy_loss) if a.compile else cross_entropy_loss
    amp = lambda: maybe_enable_amp(pd, jc.training.mixed_precision_param, device.type)  # noqa: E731

    def step(ids):
        B, S = ids.shape
        with amp():
            pred = model(ids)
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        loss = loss_fn(pred, labels) / (B * (S - 1))
        del pred
        loss.backward()
        return loss

    return model, step


def build_hf(a, world, device):
    """transformers' LlamaForCausalLM (SDPA) with FSDP2 per layer + root, bf16 params, fp32 reduce."""
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cfg = dtllama_config(a.shape)
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf())
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_cfg)
    if a.ac != "none":
        model.gradient_checkpointing_enable()
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        if a.compile:
            layer.compile(fullgraph=False)
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    model.to_empty(device=device)
    with torch.device(device):  # its inv_freq buffer was built on meta
        model.model.rotary_emb = type(model.model.rotary_emb)(hf_cfg)
    if a.init:
        load_full(model, torch.load(a.init))

    def step(ids):
        B, S = ids.shape
        logits = model(input_ids=ids).logits.float()
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum",
                                                 ignore_index=-100) / (B * (S - 1))
        del logits
        loss.backward()
        return loss

    return model, step


def init_distributed() -> torch.device:
    """Join the torchrun process group (NCCL on GPUs, gloo on the CPU); this rank's device."""
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return device


def worker(a) -> None:
    """One implementation under torchrun: time `warmup + steps` steps, then train on to `loss_steps`."""
    device = init_distributed()
    cuda = device.type == "cuda"
    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.perf_counter()
    model, step = {"dtllama": build_dtllama, "titan": build_titan, "hf": build_hf}[a.impl.partition("-")[0]](
        a, world, device)
    setup_s = time.perf_counter() - t0
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, fused=cuda)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator(device=device).manual_seed(1234 + rank)
    dim, L, H, KV, F, V = SHAPES[a.shape]
    times, losses = [], []
    for i in range(max(a.warmup + a.steps, a.loss_steps)):
        ids = torch.randint(0, V, (a.batch, a.seq), device=device, generator=g)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step(ids)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if a.impl == "dtllama" and a.float8:
            from dtllama.parallel import after_optimizer_step

            after_optimizer_step(model)  # what the recipes do after each step (a no-op without FSDP float8)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        reported = loss.detach().clone()
        dist.all_reduce(reported)
        losses.append(float(reported) / world)
        if a.warmup <= i < a.warmup + a.steps:
            times.append(dt)
        if i == a.warmup - 1 and cuda:
            torch.cuda.reset_peak_memory_stats()
    if a.profile and rank == 0:
        profile_steps(step, opt, lambda: torch.randint(0, V, (a.batch, a.seq), device=device, generator=g), a.impl)
    med = statistics.median(times)
    tok_gpu = a.batch * a.seq / med
    flops_tok = 6 * (n_params - V * dim) + 12 * L * dim * a.seq  # torchtitan's count: embedding excluded
    row = dict(impl=a.impl, float8=a.float8, shape=a.shape, world=world, batch=a.batch, seq=a.seq, ac=a.ac,
               compile=a.compile,
               params=n_params, step_ms=round(med * 1e3, 1), tok_s_gpu=round(tok_gpu),
               mfu=round(tok_gpu * flops_tok / PEAK_TFLOPS / 1e12, 4),
               peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else 0.0,
               setup_s=round(setup_s, 1), losses=[round(x, 5) for x in losses])
    if rank == 0:
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def profile_steps(step, opt, batch, impl: str, n: int = 3) -> None:
    """Where a step's GPU time goes: the kernels of `n` steps by total time, and their sum by kind."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step(batch())
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) / n / 1e3
    print(f"\n## {impl}: GPU kernel time per step {total:.1f} ms (top kernels, ms per step)")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:30]:
        print(f"{e.self_device_time_total / n / 1e3:8.2f}  {e.count // n:5d}x  {e.key[:150]}")
    kinds = {"gemm": ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas"), "attention": ("flash", "fmha", "attn"),
             "triton": ("triton",), "copy/cast": ("copy", "cast", "elementwise", "vectorized"),
             "nccl": ("nccl",), "optimizer": ("adam", "multi_tensor", "foreach")}
    by_kind = dict.fromkeys(kinds, 0.0)
    for e in events:
        name = e.key.lower()
        kind = next((k for k, pats in kinds.items() if any(p in name for p in pats)), None)
        if kind:
            by_kind[kind] += e.self_device_time_total / n / 1e3
    print("by kind (ms per step): " + ", ".join(f"{k} {v:.1f}" for k, v in by_kind.items())
          + f", other {total - sum(by_kind.values()):.1f}", flush=True)


def drive(a) -> list[dict]:
    """Run each implementation in its own torchrun, then print the side-by-side table and JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out, init = os.path.join(tmp, "rows.jsonl"), os.path.join(tmp, "init.pt")
        flags = ["--shape", a.shape, "--batch", str(a.batch), "--seq", str(a.seq), "--ac", a.ac, "--steps",
                 str(a.steps), "--warmup", str(a.warmup), "--loss-steps", str(a.loss_steps), "--lr", str(a.lr),
                 "--out", out, "--init", init] + (["--compile"] if a.compile else []) + (["--profile"] if a.profile else [])
        flags += ["--float8", a.float8] if a.float8 else []
        for impl in ["dtllama"] + [i for i in a.impls.split(",") if i != "dtllama"]:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc),
                   os.path.abspath(__file__), "--impl", impl, *flags]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if a.profile:
                print(proc.stdout[proc.stdout.find("\n## "):], flush=True)
            if proc.returncode:
                print(f"{impl} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", flush=True)
        with open(out) as f:
            rows = [json.loads(line) for line in f]
    report(rows)
    return rows


def report(rows: list[dict]) -> None:
    ref = next((r for r in rows if r["impl"] == "dtllama"), None)
    titan = next((r for r in rows if r["impl"] == "titan"), None)
    print(f"\n| {rows[0]['shape']} shape, {rows[0]['world']} GPU(s), B={rows[0]['batch']} x {rows[0]['seq']}, "
          f"ac={rows[0]['ac']}, compile={rows[0]['compile']} | step ms | tokens/s/GPU | MFU | peak GiB | "
          f"vs torchtitan | loss diff vs dtllama (max rel, {len(rows[0]['losses'])} steps) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        vs = f"{r['tok_s_gpu'] / titan['tok_s_gpu']:.3f}x" if titan else "-"
        diff = max(abs(x - y) / abs(y) for x, y in zip(r["losses"], ref["losses"])) if ref else float("nan")
        r["loss_rel_diff_vs_dtllama"] = diff
        flag = "" if diff <= BF16_LOSS_TOL else f" (above the bf16 bound {BF16_LOSS_TOL})"
        print(f"| {r['impl']} | {r['step_ms']} | {r['tok_s_gpu']:,} | {100 * r['mfu']:.1f}% | {r['peak_gib']} | {vs} "
              f"| {diff:.1e}{flag} |")
    print("JSON " + json.dumps(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["dtllama", "titan", "hf"] + [f"dtllama-{v}" for v in ABLATIONS],
                   help="(worker) run one implementation")
    p.add_argument("--impls", default="dtllama,titan,hf",
                   help="implementations to compare; dtllama-<variant> takes one speed-up out: "
                        + "; ".join(f"{k}: {v}" for k, v in ABLATIONS.items()))
    p.add_argument("--nproc", type=int, default=1, help="GPUs (one torchrun process each)")
    p.add_argument("--shape", choices=list(SHAPES), default="1b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--ac", choices=["none", "selective", "full"], default="none")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--float8", choices=["tensorwise", "rowwise"], help="float8 training (torchao): dtllama through "
                   "parallelize's option, torchtitan by torchao's conversion of every linear but the head")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--loss-steps", type=int, default=20, help="steps whose losses are compared")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--out", help="(worker) append the row here")
    p.add_argument("--init", help="(worker) dtllama writes its init here; the others read it")
    p.add_argument("--json", help="(driver) also write the rows here")
    p.add_argument("--profile", action="store_true", help="also print where 3 steps' GPU time goes, per implementation")
    a = p.parse_args()
    if a.impl:
        worker(a)
        return
    rows = drive(a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
