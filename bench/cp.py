"""How long a sequence trains with Ulysses context parallelism, against FSDP alone, on the same GPUs.

    python bench/cp.py --nproc 2                 # Llama-3.1-8B shape, cp=1 vs cp=2, each layout in its own torchrun
    torchrun --standalone --nproc-per-node 2 bench/cp.py --shape tiny --min-len 64 --max-len 256   # both in one process

With `--nproc` the script is a driver: each layout runs in a torchrun of its own, so nothing one layout left
in the CUDA allocator (or in NCCL) shortens the other's search; the driver merges their rows. Under torchrun
it runs the layouts of `--layouts` one after the other in one process group. For each layout (`cp=1`: FSDP2 over all ranks; `cp=--cp`: FSDP2 over `dp_shard x cp`), one run builds
the model on meta, parallelizes it (bf16 parameters and fp32 reduce on GPU, fp32 on CPU; selective AC
by default), initializes it from the same seed, then:
1. the loss of one fixed global batch (`world` random documents of `--loss-len` tokens, dealt over the
   batch mesh: one per rank at cp=1, all of them packed per CP group at cp>1): both layouts compute the
   same loss, up to bf16 rounding;
2. a doubling search from `--min-len` to `--max-len` for the longest single document that trains one step
   (forward, backward, AdamW) on each CP group, catching out-of-memory. A step that fits is timed
   (median of `--steps` after one warm-up) as tokens/s/GPU over the global batch.
It prints one JSON object: each layout's longest length, tokens/s/GPU at every length that fit, the
tokens/s/GPU of both at the longest length both fit, and the two losses.

Between lengths the allocator's cache is emptied and, unless PYTORCH_CUDA_ALLOC_CONF says otherwise, CUDA
memory uses expandable segments, so a longer document is not refused for blocks cached at a shorter one.
Out-of-memory is caught on each rank and agreed over all ranks before the next step. The ranks of a
layout run identical shapes, so they allocate alike and run out of memory in the same op; a rank that
failed alone, mid-collective, would leave its peers waiting (NCCL's timeout then ends the run).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before the first CUDA allocation

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import SHAPES, dtllama_config, init_distributed  # noqa: E402  (bench/train.py: the shared model shapes)

import dtllama  # noqa: E402
from dtllama.ops import cu_seqlens_from_lengths, pad_to_multiple, shift_labels  # noqa: E402
from dtllama.parallel import FSDPOptions, ParallelDims, parallelize  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="8b")
    p.add_argument("--cp", type=int, default=2, help="the context-parallel degree compared with cp=1")
    p.add_argument("--nproc", type=int, help="(driver) GPUs: run each layout in its own torchrun on this many")
    p.add_argument("--layouts", help="(under torchrun) comma-separated CP degrees to run; default 1 and --cp")
    p.add_argument("--min-len", type=int, default=8192, help="first sequence length of the doubling search")
    p.add_argument("--max-len", type=int, default=1 << 20, help="stop the search here")
    p.add_argument("--loss-len", type=int, default=1024, help="document length of the loss comparison")
    p.add_argument("--steps", type=int, default=3, help="timed steps per length (after one warm-up)")
    p.add_argument("--ac", choices=["none", "selective", "full"], default="selective")
    p.add_argument("--compile", action="store_true", help="compile each block")
    p.add_argument("--lr", type=float, default=1e-5)
    return p.parse_args(argv)


class Layout:
    """One parallelized model and its optimizer for one CP degree; `step` trains on a global batch."""

    def __init__(self, a, cp: int, device: torch.device):
        self.config = dtllama_config(a.shape)
        self.dims = ParallelDims(dp_shard=-1, cp=cp).resolve(dist.get_world_size(), self.config)
        self.dims.build_mesh(device.type)
        with torch.device("meta"):
            self.model = dtllama.LlamaForCausalLM(self.config)
        bf16 = FSDPOptions(param_dtype=torch.bfloat16) if device.type == "cuda" else FSDPOptions()
        parallelize(self.model, self.dims, ac=a.ac, compile=a.compile, fsdp=bf16)
        self.model.to_empty(device=device)
        self.model.init_weights(0)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=a.lr, fused=device.type == "cuda")
        self.device = device

    def local_batch(self, docs: list[torch.Tensor]):
        """This rank's documents of the global batch (dealt over the batch mesh), packed and padded."""
        mesh = self.dims.mesh("batch")
        mine = docs[mesh.get_local_rank()::mesh.size()]
        ids = torch.cat(mine).to(self.device)
        cu = cu_seqlens_from_lengths([len(d) for d in mine], device=self.device)
        return pad_to_multiple(ids, cu, self.dims.token_multiple, shift_labels(ids, cu))

    def loss(self, docs: list[torch.Tensor], train: bool) -> float:
        """Mean next-token loss over the global batch; with `train`, backward and an AdamW step too."""
        p = self.local_batch(docs)
        n_global = sum(len(d) - 1 for d in docs)
        dp = self.dims.mesh("dp")
        with torch.set_grad_enabled(train):
            out = self.model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=p.labels)
            loss = -out.logprobs.sum() / n_global * dp.size()  # FSDP averages over dp (cp included)
        if train:
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        reported = loss.detach().float() / dp.size()
        dist.all_reduce(reported, group=dp.get_group())
        return float(reported)

    def close(self) -> None:
        del self.model, self.opt
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def documents(n: int, length: int, vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g) for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def try_length(layout: Layout, length: int, a) -> float | None:
    """tokens/s/GPU of one document of `length` per CP group, or None if any rank ran out of memory."""
    n_docs = layout.dims.mesh("batch").size()
    docs = documents(n_docs, length, layout.config.vocab_size, seed=length)
    times, oom = [], False
    try:
        for i in range(a.steps + 1):  # the first step warms up (allocator, compile)
            sync(layout.device)
            t0 = time.perf_counter()
            layout.loss(docs, train=True)
            sync(layout.device)
            if i:
                times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        oom = True
        layout.opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()  # only CUDA raises OutOfMemoryError
    if layout.device.type == "cuda":
        torch.cuda.empty_cache()  # the next, longer document needs larger blocks than this one cached
    flag = torch.tensor([oom], dtype=torch.int32, device=layout.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        return None
    return n_docs * length / statistics.median(times) / dist.get_world_size()


def run_layout(a, cp: int, device: torch.device, loss_docs: list[torch.Tensor]) -> dict:
    """Loss on the shared batch, then the doubling search; the layout's row of the report."""
    layout = Layout(a, cp, device)
    row = {"cp": cp, "loss": layout.loss(loss_docs, train=False), "tok_s_gpu": {}, "longest": None}
    length = a.min_len
    while length <= a.max_len:
        tok_s = try_length(layout, length, a)
        if tok_s is None:
            break
        row["longest"], row["tok_s_gpu"][str(length)] = length, round(tok_s, 1)  # str: as JSON has it
        length *= 2
    layout.close()
    return row


def report(a, world: int, rows: list[dict]) -> dict:
    """Both layouts' rows side by side: the longest length both fit, tokens/s/GPU there, the loss difference."""
    fits = [r["longest"] for r in rows]
    both = min(fits) if None not in fits else None
    result = {"shape": a.shape, "world": world, "ac": a.ac, "compile": a.compile,
              "dtype": "bf16" if rows[0]["device"] == "cuda" else "fp32", "layouts": rows, "length_both_fit": both,
              "tok_s_gpu_at_length_both_fit": {r["cp"]: r["tok_s_gpu"].get(str(both)) for r in rows},
              "loss_rel_diff": abs(rows[0]["loss"] - rows[-1]["loss"]) / abs(rows[0]["loss"])}
    for r in rows:
        print(f"cp={r['cp']}: longest single document that trains one step: {r['longest']} tokens; "
              f"loss on the shared batch {r['loss']:.5f}")
    print(f"tokens/s/GPU at {both} tokens: " + ", ".join(f"cp={k}: {v}" for k, v in
                                                        result["tok_s_gpu_at_length_both_fit"].items()))
    print("JSON " + json.dumps(result), flush=True)
    return result


def worker(a) -> list[dict]:
    """Under torchrun: the rows of the layouts in `--layouts`, run one after the other."""
    device = init_distributed()
    world = dist.get_world_size()
    loss_docs = documents(world, a.loss_len, dtllama_config(a.shape).vocab_size, seed=0)
    cps = [int(c) for c in a.layouts.split(",")] if a.layouts else [1, a.cp]
    rows = [dict(run_layout(a, cp, device, loss_docs), device=device.type) for cp in cps]
    if dist.get_rank() == 0:
        if len(rows) > 1:
            report(a, world, rows)
        else:
            print("ROW " + json.dumps(rows[0]), flush=True)
    dist.destroy_process_group()
    return rows


def drive(a, argv: list[str]) -> dict:
    """Each layout in a torchrun of its own on `--nproc` processes; their rows merged into one report."""
    rows = []
    for cp in (1, a.cp):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc),
               os.path.abspath(__file__), *argv, "--layouts", str(cp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode or "ROW " not in proc.stdout:
            sys.exit(f"cp={cp} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        rows.append(json.loads(proc.stdout.split("ROW ", 1)[1].splitlines()[0]))
    return report(a, a.nproc, rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.nproc:
        i = next(i for i, x in enumerate(argv) if x.startswith("--nproc"))
        return drive(a, argv[:i] + argv[i + (1 if "=" in argv[i] else 2):])
    return worker(a)


if __name__ == "__main__":
    main()
