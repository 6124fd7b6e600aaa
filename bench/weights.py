"""Weight streaming to a rollout engine on one GPU: a Llama-3.1-8B-shaped model under FSDP2 (one rank) with fp32
master weights, streamed as bf16 in 1 GiB buckets of full tensors under HF names
(`dtllama.train.weights.stream_weights`) into an engine's bf16 weights (preallocated tensors on the same GPU, each
bucket copied in as `load_weights` would), against the naive way: `model.state_dict()`, `full_tensor()` and the
bf16 cast of every parameter, all held at once, then copied in.

    python bench/weights.py                          # llama3.1-8b, 1 GiB buckets, bf16
    python bench/weights.py --flavor debug --bucket-mib 1 --reps 1   # CPU smoke run (gloo)

"GB/s" counts the bf16 bytes delivered. Each parameter moves 10 bytes of memory traffic (fp32 read, bf16 written by
the cast, then read and written by the copy into the engine), and that traffic rate is set against the
device-to-device copy rate (a 1 GiB `copy_`, read + write counted, as `bench/ops.py` counts it). Peak memory is
what each way allocates beyond the model and the engine's weights. Prints a table and the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import dtllama
from dtllama.parallel import FSDPOptions, ParallelDims
from dtllama.parallel.fsdp import apply_fsdp
from dtllama.train.weights import stream_weights


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int, device) -> float:
    """Median seconds of `fn()` over `reps` runs after one warm-up."""
    times = []
    for i in range(reps + 1):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_rate(device) -> float:
    """GB/s of a 1 GiB device-to-device copy, counting read + write."""
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    s = timed(lambda: y.copy_(x), 5, device)
    return 2 * x.numel() / s / 1e9


def build(flavor: str, device):
    config = dtllama.flavors[flavor]
    dims = ParallelDims(dp_shard=1).resolve(1, config)
    dims.build_mesh(device.type)
    with torch.device("meta"):
        model = dtllama.LlamaForCausalLM(config)  # fp32 master weights, as training keeps them
    apply_fsdp(model, dims.mesh("fsdp"), FSDPOptions(param_dtype=torch.bfloat16))
    model.to_empty(device=device)
    with torch.no_grad():  # on the device: the layout-independent host init would take minutes at 8B
        for p in model.parameters():
            p.to_local().normal_(0.0, 0.02)
    model.reset_buffers()
    return model, dims


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="llama3.1-8b")
    p.add_argument("--bucket-mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    if cuda:
        torch.cuda.set_device(device)
    model, dims = build(a.flavor, device)
    engine = {k: torch.empty(v.shape, dtype=torch.bfloat16, device=device) for k, v in model.state_dict().items()}
    model_bytes = sum(t.numel() * t.element_size() for t in engine.values())  # bf16, as delivered
    bucket = a.bucket_mib * 2**20

    def stream():
        for b in stream_weights(model, dims, bucket_bytes=bucket, dtype=torch.bfloat16):
            for name, t in b:  # what an engine's load_weights(b) does with each: copy into its parameter
                engine[name].copy_(t)

    def naive():
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).to(torch.bfloat16)
                for k, v in model.state_dict().items()}
        for name, t in full.items():
            engine[name].copy_(t)

    rows = []
    for name, fn in (("stream_weights, buckets", stream), ("state_dict + full_tensor", naive)):
        if cuda:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        s = timed(fn, a.reps, device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
        rows.append({"impl": name, "seconds": s, "gb_s": model_bytes / s / 1e9, "extra_peak_gib": peak})
    ceiling = copy_rate(device) if cuda else None
    for r in rows:
        r["of_copy_rate"] = 5 * r["gb_s"] / ceiling if ceiling else None  # 10 bytes of traffic per 2 delivered
    print(f"{a.flavor}: {model_bytes / 2**30:.2f} GiB of bf16 weights (fp32 masters), FSDP2 on 1 rank, buckets of "
          f"{a.bucket_mib} MiB, "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}; device-to-device copy "
          f"{'-' if ceiling is None else f'{ceiling:.0f} GB/s'}")
    print(f"{'impl':<27}{'seconds':>9}{'GB/s':>9}{'of copy':>9}{'extra peak GiB':>16}")
    for r in rows:
        frac = "-" if r["of_copy_rate"] is None else f"{r['of_copy_rate']:.1%}"
        peak = "-" if r["extra_peak_gib"] is None else f"{r['extra_peak_gib']:.2f}"
        print(f"{r['impl']:<27}{r['seconds']:>9.3f}{r['gb_s']:>9.1f}{frac:>9}{peak:>16}")
    print("JSON " + json.dumps(rows), flush=True)
    dist.destroy_process_group()
    return rows


if __name__ == "__main__":
    main()
