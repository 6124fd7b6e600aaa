"""Benchmark: loading a Hugging Face checkpoint straight into FSDP2 vs reading its files raw.

    python bench/load_hf.py write DIR [FLAVOR]                   # a random bf16 checkpoint (llama3.1-8b)
    python bench/load_hf.py raw DIR                              # read every tensor of every file
    torchrun --standalone --nproc-per-node 2 bench/load_hf.py load DIR   # meta -> FSDP2 -> DCP HF read
    python bench/load_hf.py report OUT_DIR                       # table + JSON of the runs above

Each mode appends a JSON line to `$BENCH_OUT/load_hf.jsonl` (default: the current folder) with its
time and peak host memory (max RSS) per process.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import time

import torch

import dtllama


def _record(row: dict) -> None:
    out = os.path.join(os.environ.get("BENCH_OUT", "."), "load_hf.jsonl")
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write(folder: str, flavor: str = "llama3.1-8b", shard_bytes: int = 5 * 2**30) -> None:
    """Random bf16 weights with the flavor's shapes, written file by file (never the whole model), laid
    out as `save_pretrained` lays them out."""
    from safetensors.torch import save_file

    from dtllama.models.hf_io import _shard_index, _write_metadata

    config = dtllama.flavors[flavor]
    with torch.device("meta"):
        model = dtllama.LlamaForCausalLM(config).to(torch.bfloat16)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    index = _shard_index(model, torch.bfloat16, shard_bytes)
    n_files = max(index.values())
    weight_map = {k: f"model-{i:05d}-of-{n_files:05d}.safetensors" for k, i in index.items()}
    os.makedirs(folder, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for i in range(1, n_files + 1):
        names = [k for k, j in index.items() if j == i]
        tensors = {k: (torch.randn(shapes[k], device=dev, dtype=torch.bfloat16) * 0.02).cpu() for k in names}
        save_file(tensors, os.path.join(folder, weight_map[names[0]]), metadata={"format": "pt"})
    total = sum(s.numel() for s in shapes.values()) * 2
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    _write_metadata(folder, config, model.hf_architecture, torch.bfloat16, None)
    _record({"mode": "write", "flavor": flavor, "bytes": total, "files": n_files})


def raw(folder: str) -> None:
    """The floor: read every byte of every safetensors file into one reused host buffer, one process."""
    buf = bytearray(256 * 2**20)
    view = memoryview(buf)
    t0, nbytes = time.perf_counter(), 0
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
        with open(os.path.join(folder, name), "rb", buffering=0) as f:
            while n := f.readinto(view):
                nbytes += n
    _record({"mode": "raw", "seconds": time.perf_counter() - t0, "bytes": nbytes, "peak_host_gib": _rss_gib()})


def load(folder: str) -> None:
    """Meta-device model -> FSDP2 over all ranks -> each rank reads its slices into GPU memory."""
    import torch.distributed as dist

    from dtllama.models.hf_io import load_state_into
    from dtllama.parallel import FSDPOptions, ParallelDims, parallelize

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank = dist.get_rank()
    config = dtllama.ModelConfig.from_hf(folder)
    dims = ParallelDims().resolve(dist.get_world_size(), config)
    dims.build_mesh(device.type)
    # Process start-up is not loading, so it happens before the clock and is reported apart:
    # - torch 2.11 imports torch._dynamo lazily, at the first call of a function wrapped in
    #   `torch._disable_dynamo` (about 2 s, while the model is built); torch 2.13 imports it with torch.
    # - the first NCCL collective sets up the communicator and returns before it finishes, so every
    #   rank waits for a completed barrier.
    t_start = time.perf_counter()
    importlib.import_module("torch._dynamo")
    _barrier(cuda)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = dtllama.LlamaForCausalLM(config)
    parallelize(model, dims, fsdp=FSDPOptions(param_dtype=torch.bfloat16 if device.type == "cuda" else None))
    model.to_empty(device=device)  # fp32 master weights; the bf16 file values are cast on copy
    t_read = time.perf_counter()
    load_state_into(model, folder)
    _barrier(cuda)
    seconds, read_seconds, setup_seconds = time.perf_counter() - t0, time.perf_counter() - t_read, t_read - t0
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, _rss_gib())
    if rank == 0:
        _record({"mode": "load_fsdp", "world": dist.get_world_size(), "seconds": seconds, "setup_seconds": setup_seconds,
                 "read_seconds": read_seconds, "startup_seconds": t0 - t_start, "peak_host_gib_per_rank": peaks})
    dist.destroy_process_group()


def _barrier(cuda: bool) -> None:
    """A barrier that has completed on the GPU too, so the clock brackets only finished work."""
    import torch.distributed as dist

    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    if cuda:
        torch.cuda.synchronize()


def report(out_dir: str) -> None:
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "load_hf.jsonl"))]
    by = {r["mode"]: r for r in rows}
    size = by["write"]["bytes"] / 2**30
    raw_s, load_s = by["raw"]["seconds"], by["load_fsdp"]["seconds"]
    table = [
        ("checkpoint", f"{by['write']['flavor']}, bf16, {size:.1f} GiB in {by['write']['files']} files"),
        ("raw read (1 process)", f"{raw_s:.1f} s ({size / raw_s:.2f} GiB/s), peak host {by['raw']['peak_host_gib']:.1f} GiB"),
        (f"load into FSDP2 ({by['load_fsdp']['world']} GPUs)", f"{load_s:.1f} s = {load_s / raw_s:.2f}x raw "
         f"(meta -> FSDP2 -> GPU memory {by['load_fsdp']['setup_seconds']:.1f} s, read {by['load_fsdp']['read_seconds']:.1f} s)"),
        ("process start-up before the clock", f"{by['load_fsdp']['startup_seconds']:.1f} s (import torch._dynamo, first barrier); "
         f"counted in: {(load_s + by['load_fsdp']['startup_seconds']) / raw_s:.2f}x raw"),
        ("peak host memory per rank", ", ".join(f"{g:.1f} GiB" for g in by["load_fsdp"]["peak_host_gib_per_rank"])),
    ]
    for k, v in table:
        print(f"| {k} | {v} |")
    print(json.dumps({"gib": size, "raw_s": raw_s, "load_s": load_s, "ratio": load_s / raw_s,
                      "startup_s": by["load_fsdp"]["startup_seconds"],
                      "peak_host_gib_per_rank": by["load_fsdp"]["peak_host_gib_per_rank"]}))


if __name__ == "__main__":
    mode, folder = sys.argv[1], sys.argv[2]
    {"write": lambda: write(folder, *sys.argv[3:]), "raw": lambda: raw(folder), "load": lambda: load(folder),
     "report": lambda: report(folder)}[mode]()
