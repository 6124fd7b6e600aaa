"""Pipeline schedules side by side: tokens/s and the measured bubble next to the theoretical one.

    torchrun --standalone --nproc-per-node 2 bench/pp.py                 # Llama-3.2-1B shape (untied), pp=2
    torchrun --standalone --nproc-per-node 1 bench/pp.py                 # the pp=1 baseline alone (one GPU)
    torchrun --standalone --nproc-per-node 2 bench/pp.py --shape tiny --microbatch-tokens 64 --steps 1   # CPU

Every layout trains on the same global batch: `--microbatches` random documents of `--microbatch-tokens`
tokens, one per microbatch. The baseline (`pp=1`) is FSDP2 over all ranks, each rank running its share of the
microbatches one after the other (gradient accumulation); each schedule runs `pp=world` with that many
microbatches. bf16 parameters with fp32 reduction on GPU (fp32 on CPU), AdamW, median of `--steps` timed
steps after `--warmup`.

Bubble: a rank's compute per step, C, is its stages' forward + backward of all microbatches one after the other,
timed without the schedule (no send/recv; FSDP's gradient reduction deferred as in the schedule), so it carries
the same host overhead; the schedule (`pipe.step`: every microbatch's forward and backward with their sends and
receives, not the optimizer step, gradient clipping or the loss all-reduce that follow it and cost the same
without a pipeline) takes T. The measured bubble is (T - C) / C,
idle time relative to compute, the quantity the schedules' formulas give: (p-1)/m for GPipe and 1F1B,
(p-1)/(v*m) for interleaved ones with v stages per rank; the zero-bubble schedules fill part of it with
weight-gradient work (no closed form: expected below 1F1B). The formulas assume equal stages, so the bubble is
read on the busiest rank (the one that bounds the step); the least busy rank idles that much plus the stages'
imbalance, shown beside it ("idle, least busy").
Each layout's first-step loss is compared with the baseline's (bf16 noise on GPU, fp32 rounding on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import PEAK_TFLOPS, SHAPES, dtllama_config, init_distributed  # noqa: E402  (bench/train.py: the shared model shapes)

import dtllama  # noqa: E402
from dtllama.ops import Packed, cu_seqlens_from_lengths, position_ids_from_cu_seqlens, shift_labels  # noqa: E402
from dtllama.parallel import FSDPOptions, ParallelDims, clip_grad_norm_, parallelize  # noqa: E402
from dtllama.parallel.pp import SCHEDULES, PipelineOptions, pipeline_llm  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="1b")
    p.add_argument("--schedules", default="1F1B,Interleaved1F1B,ZBVZeroBubble,DualPipeV",
                   help=f"comma-separated, from {list(SCHEDULES)} (skipped on one rank)")
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--microbatch-tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--head-cost", type=float, help="the head in decoder layers for the stage split (default: by FLOPs)")
    p.add_argument("--ac", choices=["none", "selective", "full"], default="none")
    p.add_argument("--compile", action="store_true", help="compile each block")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Run:
    """One layout: its model (whole, or this rank's pipeline part), optimizer and how it takes a step."""

    def __init__(self, args, schedule: str | None, config, device):
        world = dist.get_world_size()
        pp = world if schedule else 1
        self.dims = ParallelDims(pp=pp).resolve(world, config)
        self.dims.build_mesh(device.type)
        self.device, self.args, self.schedule = device, args, schedule
        fsdp = FSDPOptions(param_dtype=torch.bfloat16 if device.type == "cuda" else None)
        with torch.device("meta"):
            model = dtllama.LlamaForCausalLM(config)
        self.pipe = None
        if schedule:
            options = PipelineOptions(schedule, args.microbatches, args.microbatch_tokens, head_cost=args.head_cost)
            self.pipe = pipeline_llm(model, self.dims, options, device, ac=args.ac, compile=args.compile, fsdp=fsdp)
            self.pipe.to_empty(device)
            model = self.pipe.model
        else:
            parallelize(model, self.dims, ac=args.ac, compile=args.compile, fsdp=fsdp)
            model.to_empty(device=device)
        model.init_weights(0)
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        self.schedule_s: list[float] = []  # each step's `pipe.step` alone (no optimizer, clipping, loss reduce)

    def step(self, docs: list[torch.Tensor]) -> float:
        """One optimizer step over all `docs` (one per microbatch); returns the mean loss over all tokens."""
        n_global = sum(d.numel() - 1 for d in docs)
        if self.pipe is None:
            rank, world = dist.get_rank(), dist.get_world_size()
            total = torch.zeros((), device=self.device)
            for d in docs[rank::world]:  # this rank's microbatches, one after the other
                p = packed([d])
                loss = -self.model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen,
                                   labels=p.labels).logprobs.sum() * world / n_global
                loss.backward()
                total += loss.detach() / world
            dist.all_reduce(total)
        else:
            mbs = self.pipe.split(packed(docs))
            sync(self.device)
            t = time.perf_counter()
            result = self.pipe.step(mbs, lambda out, i: -out[0].sum() / n_global)
            sync(self.device)
            self.schedule_s.append(time.perf_counter() - t)
            total = torch.stack(result[1]).sum() if result else torch.zeros((), device=self.device)
            dist.all_reduce(total)
        clip_grad_norm_(self.model.parameters(), 1.0, pp_mesh=self.dims.mesh("pp"))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(total)

    def compute_seconds(self, doc: torch.Tensor) -> float:
        """This rank's stages' forward + backward of `microbatches` microbatches one after the other, with no
        schedule, send or receive (median of 3 after a warm-up). FSDP defers its gradient reduction and keeps
        parameters unsharded in between, as the schedule does for every microbatch but the last."""
        from torch.distributed.fsdp import FSDPModule

        mbs = self.pipe.split(packed([doc]))
        kwargs = {k: v[: v.numel() // self.args.microbatches] for k, v in mbs.kwargs().items()}
        fsdp = [m for module in self.pipe.stage_modules for m in module.modules() if isinstance(m, FSDPModule)]
        for m in fsdp:
            m.set_requires_gradient_sync(False, recurse=False)
            m.set_reshard_after_backward(False, recurse=False)
        times = []
        for _ in range(4):
            sync(self.device)
            t = time.perf_counter()
            for _ in range(self.args.microbatches):
                for stage, module in zip(self.pipe.stages, self.pipe.stage_modules):
                    out = module(self.stage_input(stage, module, mbs), **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    out.backward(torch.randn_like(out) * 1e-3)
            sync(self.device)
            times.append(time.perf_counter() - t)
        for m in fsdp:
            m.set_requires_gradient_sync(True, recurse=False)
            m.set_reshard_after_backward(True, recurse=False)
        self.opt.zero_grad(set_to_none=True)
        return statistics.median(times[1:])

    def stage_input(self, stage, module, mbs) -> torch.Tensor:
        if stage.is_first:
            return mbs.args()[0][: self.args.microbatch_tokens]
        return torch.randn(self.args.microbatch_tokens // self.dims.token_multiple, module.config.hidden_size,
                           device=self.device, requires_grad=True,
                           dtype=torch.bfloat16 if self.device.type == "cuda" else torch.float32)


def packed(docs: list[torch.Tensor]) -> Packed:
    ids = torch.cat(docs)
    cu = cu_seqlens_from_lengths([d.numel() for d in docs], device=ids.device)
    return Packed(ids, position_ids_from_cu_seqlens(cu, ids.numel()), cu, max(d.numel() for d in docs), None,
                  shift_labels(ids, cu))


def theoretical_bubble(schedule: str | None, pp: int, m: int) -> float | None:
    if schedule is None:
        return 0.0
    placement = SCHEDULES[schedule].placement
    if placement == "single":
        return (pp - 1) / m
    if placement == "loop":
        return (pp - 1) / (2 * m)
    return None


def run_layout(args, schedule, config, device, batches) -> dict:
    run = Run(args, schedule, config, device)
    losses, times = [], []
    for i, docs in enumerate(batches):
        sync(device)
        t = time.perf_counter()
        losses.append(run.step(docs))
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    row = dict(schedule=schedule or "none (FSDP)", pp=run.dims.pp, first_loss=losses[0], step_s=step_s,
               tok_s=args.microbatches * args.microbatch_tokens / step_s,
               peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)
    row["tok_s_gpu"] = row["tok_s"] / dist.get_world_size()
    h, L, S = config.hidden_size, config.num_hidden_layers, args.microbatch_tokens
    flops_tok = 6 * (config.num_params() - config.vocab_size * h) + 12 * L * h * S  # torchtitan's count
    row["mfu"] = flops_tok * row["tok_s_gpu"] / (PEAK_TFLOPS * 1e12)
    row["bubble_theory"] = theoretical_bubble(schedule, run.dims.pp, args.microbatches)
    if run.pipe is not None:
        compute = torch.tensor([run.compute_seconds(batches[0][0])], device=device)
        per_rank = [torch.zeros_like(compute) for _ in range(dist.get_world_size())]
        dist.all_gather(per_rank, compute)
        busiest, least = max(float(c) for c in per_rank), min(float(c) for c in per_rank)
        row["compute_s_per_rank"] = [round(float(c), 4) for c in per_rank]
        schedule_s = statistics.median(run.schedule_s[args.warmup:])
        row["bubble_measured"] = (schedule_s - busiest) / busiest  # the rank that bounds the step
        row["idle_least_busy"] = (schedule_s - least) / least  # the bubble plus the stages' imbalance
        row["schedule_s"] = schedule_s
    else:
        row["bubble_measured"] = row["idle_least_busy"] = 0.0
    del run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    args = parse_args(argv)
    device = init_distributed()
    cuda = device.type == "cuda"
    config = dtllama_config(args.shape)
    g = torch.Generator().manual_seed(0)
    batches = [[torch.randint(0, config.vocab_size, (args.microbatch_tokens,), generator=g).to(device)
                for _ in range(args.microbatches)] for _ in range(args.warmup + args.steps)]
    schedules = [None] + ([s for s in args.schedules.split(",") if s] if dist.get_world_size() > 1 else [])
    rows, skipped = [], {}
    for s in schedules:
        try:
            rows.append(run_layout(args, s, config, device, batches))
        except ValueError as e:  # refused before any collective, on every rank alike (e.g. by this torch)
            skipped[s] = str(e)
    for r in rows:
        r["loss_rel_diff"] = abs(r["first_loss"] - rows[0]["first_loss"]) / abs(rows[0]["first_loss"])
    if dist.get_rank() == 0:
        print(f"{args.shape} shape, {config.num_params() / 1e9:.2f} B params, {dist.get_world_size()} x "
              f"{torch.cuda.get_device_name() if cuda else 'cpu'}, {args.microbatches} microbatches x "
              f"{args.microbatch_tokens} tokens, ac={args.ac}, compile={args.compile}")
        print(f"{'schedule':<22}{'pp':>3}{'tok/s':>10}{'tok/s/gpu':>11}{'MFU':>7}{'bubble':>8}{'theory':>8}{'idle*':>7}"
              f"{'loss':>10}{'vs pp=1':>10}{'GiB':>7}")
        for r in rows:
            theory = "-" if r["bubble_theory"] is None else f"{r['bubble_theory']:.3f}"
            mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
            print(f"{r['schedule']:<22}{r['pp']:>3}{r['tok_s']:>10.0f}{r['tok_s_gpu']:>11.0f}{r['mfu']:>7.1%}"
                  f"{r['bubble_measured']:>8.3f}{theory:>8}{r['idle_least_busy']:>7.3f}{r['first_loss']:>10.5f}{r['loss_rel_diff']:>10.1e}{mem:>7}")
        print("bubble: the busiest rank's idle time over its compute; idle*: the least busy rank's (imbalance too)")
        for s, why in skipped.items():
            print(f"{s}: not run: {why}")
        print("JSON " + json.dumps(dict(shape=args.shape, world=dist.get_world_size(), rows=rows, skipped=skipped)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
