"""Fine-tune a Llama-family model with FSDP2 on packed batches; run under torchrun.

    torchrun --standalone --nproc-per-node 2 recipes/train.py          # SmolLM2-135M-Instruct, built-in corpus
    torchrun --standalone --nproc-per-node 2 recipes/train.py --flavor debug   # random tiny model, bytes
    torchrun --standalone --nproc-per-node 4 recipes/train.py --flavor debug --dp-shard 2 --tp 2 --ac full
    torchrun --standalone --nproc-per-node 4 recipes/train.py --flavor debug --cp 2 --tp 2   # Ulysses x TP
    torchrun --standalone --nproc-per-node 2 recipes/train.py --flavor debug --set num_hidden_layers=8 \
        --pp 2 --pp-schedule Interleaved1F1B --microbatches 4                                  # pipeline

The model is built on the meta device, cut into pipeline stages when `--pp` > 1, parallelized (TP/SP, Ulysses CP,
activation checkpointing, compile, FSDP2/HSDP), then materialized and initialized or loaded from the HF folder, each rank reading only
its own shards. A step's global batch is the same for every layout: sequences are drawn in one
global order up to `--batch-tokens`, and rank r of the batch mesh (`dp_replicate x dp_shard`) takes
every n-th of them; the `cp` ranks of a group share those sequences, each running its token shard.

Each step prints the loss (mean over all real tokens of all ranks), tokens/s and peak memory. At the
end the model is exported as a Hugging Face folder, which `transformers` then loads to print a
greedy continuation of a prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import time

import torch
import torch.distributed as dist

import dtllama
from dtllama.checkpoint import Checkpointer, TrainState
from dtllama.hf_io import load_state_into
from dtllama.ops import cu_seqlens_from_lengths, pad_to_multiple, shift_labels
from dtllama.optim import NONFINITE_POLICIES, step_if_finite
from dtllama.parallel import AC_MODES, FSDPOptions, ParallelDims, clip_grad_norm_, parallelize
from dtllama.parallel import pp
from dtllama.parallel.pp import SCHEDULES, PipelineOptions, pipeline_llm

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "instructions.txt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", "--init-from-hf", dest="model",
                     help="Hugging Face folder to fine-tune (default: SmolLM2-135M-Instruct)")
    src.add_argument("--flavor", choices=list(dtllama.flavors), help="train a randomly initialized flavor instead")
    p.add_argument("--data", default=DATA, help="text file, documents separated by blank lines")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-tokens", type=int, default=1024, help="tokens per step over all data-parallel ranks")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--dp-replicate", type=int, default=1)
    p.add_argument("--dp-shard", type=int, default=-1, help="-1: the ranks left over by the other degrees")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1, help="Ulysses context parallel degree (splits each batch's tokens)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel degree")
    p.add_argument("--pp-schedule", default="1F1B", choices=list(SCHEDULES), help="pipeline schedule (with --pp > 1)")
    p.add_argument("--microbatches", type=int, default=4, help="pipeline microbatches per step")
    p.add_argument("--microbatch-tokens", type=int,
                   help="tokens per pipeline microbatch (default: --max-seq-len + batch tokens / microbatches, which "
                        "always fits a step's sequences)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field of the model, e.g. --set num_hidden_layers=8 (repeatable)")
    p.add_argument("--ac", choices=list(AC_MODES), default="none", help="activation checkpointing per layer")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (fullgraph)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=2, help="linear LR warmup, then constant")
    p.add_argument("--checkpoint-dir", help="folder of sharded training-state checkpoints (DCP)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save every N steps (0: only at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="complete checkpoints to keep")
    p.add_argument("--async-checkpoint", action="store_true", help="save in the background (dcp.async_save)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export-hf", default="out/finetuned", help="folder for the exported HF checkpoint ('' to skip)")
    p.add_argument("--prompt", default="Question: What is the capital of France?\nAnswer:")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--on-nonfinite", choices=NONFINITE_POLICIES, default="stop",
                   help="a step whose loss or gradient norm is NaN/inf: stop the run, or skip the step")
    p.add_argument("--metrics", help="write per-step metrics as JSON lines to this file (rank 0)")
    return p.parse_args(argv)


class ByteTokenizer:
    """UTF-8 bytes as token ids, for random flavors that have no tokenizer."""

    eos_token_id = 0

    def encode(self, text):
        return list(text.encode())


def load_documents(path: str, tokenizer, max_len: int) -> list[list[int]]:
    with open(path) as f:
        docs = [d.strip() for d in f.read().split("\n\n") if d.strip()]
    if not docs:
        raise ValueError(f"no documents in {path!r}; separate documents with a blank line")
    eos = tokenizer.eos_token_id
    return [(tokenizer.encode(d) + [eos])[:max_len] for d in docs]


def batches(docs, batch_tokens: int, seed: int):
    """Endless global batches (lists of documents) of at most `batch_tokens` tokens, epoch-shuffled."""
    epoch = 0
    while True:
        order = list(range(len(docs)))
        random.Random(seed + epoch).shuffle(order)
        batch = []
        for i in order:
            if batch and sum(map(len, batch)) + len(docs[i]) > batch_tokens:
                yield batch
                batch = []
            batch.append(docs[i])
        if batch:
            yield batch
        epoch += 1


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def setup_distributed(seed: int):
    """Join the process group and seed torch; returns this rank's device and a print of rank 0 only."""
    cuda = torch.cuda.is_available()
    # NCCL for the GPUs, gloo beside it: async checkpointing stages and coordinates on the CPU.
    dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(seed)
    log = print if dist.get_rank() == 0 else (lambda *a, **k: None)
    return device, log


def model_source(args):
    """`(config, tokenizer, HF folder or None)`: a random flavor with byte tokens, or an HF checkpoint."""
    if args.flavor:
        config = override(dtllama.flavors[args.flavor], args.set)
        if config.vocab_size < 256:
            raise ValueError(f"flavor {args.flavor!r} has vocab_size={config.vocab_size} < 256 byte tokens")
        return config, ByteTokenizer(), None
    from transformers import AutoTokenizer

    source = args.model
    if source is None:
        from dtllama.pretrained import smollm2_135m_instruct

        if dist.get_rank() == 0:
            smollm2_135m_instruct()  # converts once; the other ranks wait for the cache
        dist.barrier()
        source = smollm2_135m_instruct()
    return override(dtllama.ModelConfig.from_hf(source), args.set), AutoTokenizer.from_pretrained(source), source


def override(config, assignments: list[str]):
    """The config with `FIELD=VALUE` overrides (VALUE read as JSON: numbers, true/false, null, else a string)."""
    fields = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of the config's fields "
                             f"({', '.join(sorted(fields))})")
        try:
            changes[name] = json.loads(value)
        except json.JSONDecodeError:
            changes[name] = value
    return dataclasses.replace(config, **changes)


def build_model(args, config, source, device):
    """Meta model -> pipeline stages (pp > 1) -> parallelize -> materialize -> init or load (each rank reads only
    its shards). Returns `(model, dims, pipeline or None)`; under pp, `model` is this rank's part of the model."""
    # Validate the layout against world size and model before any collective can hang on it.
    dims = ParallelDims(dp_replicate=args.dp_replicate, dp_shard=args.dp_shard, cp=args.cp, tp=args.tp, pp=args.pp)
    dims = dims.resolve(dist.get_world_size(), config)
    pp_options = None
    if dims.pp_enabled:
        tokens = args.microbatch_tokens or args.max_seq_len + -(-args.batch_tokens // args.microbatches)
        tokens += -tokens % dims.token_multiple
        pp_options = PipelineOptions(args.pp_schedule, args.microbatches, tokens)
        pp.check_options(config, dims, pp_options)
    dims.build_mesh(device.type)
    with torch.device("meta"):
        model = dtllama.LlamaForCausalLM(config)
    fsdp = FSDPOptions(param_dtype=torch.bfloat16 if device.type == "cuda" else None)
    pipe = None
    if dims.pp_enabled:
        pipe = pipeline_llm(model, dims, pp_options, device, ac=args.ac, compile=args.compile, fsdp=fsdp)
        pipe.to_empty(device)
        model = pipe.model
    else:
        parallelize(model, dims, ac=args.ac, compile=args.compile, fsdp=fsdp)
        model.to_empty(device=device)
    if source is None:
        model.init_weights(args.seed)
    else:
        load_state_into(model, source)
    return model, dims, pipe


def local_batch(batch, dims, tokenizer, device):
    """This rank's share of a global batch, packed, with next-token labels: the same for the CP ranks of a
    group (each then runs its own token shard), so sequences are dealt over the batch mesh, not dp."""
    rank, n = dims.mesh("batch").get_local_rank(), dims.mesh("batch").size()
    seqs = batch[rank::n] or [[tokenizer.eos_token_id]]  # a rank with no sequence still steps
    ids = torch.tensor([t for s in seqs for t in s], device=device)
    cu = cu_seqlens_from_lengths([len(s) for s in seqs], device=device)
    return pad_to_multiple(ids, cu, dims.token_multiple, shift_labels(ids, cu))  # SP and Ulysses split T evenly


def train_step(model, opt, sched, p, n_global: int, dims, on_nonfinite: str, pipe=None) -> dict:
    """Forward, backward, clip, step; returns the loss over all ranks' tokens and the gradient norm."""
    dp_mesh = dims.mesh("dp")
    # Sum over this rank's tokens / global token count, times dp: FSDP averages gradients over
    # the dp ranks (cp included: under CP the log-probs are this rank's token shard), so every token
    # weighs the same whatever rank holds it.
    scale = dp_mesh.size() / n_global
    if pipe is None:
        out = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=p.labels)
        loss = -out.logprobs.sum() * scale
        loss.backward()
        reported = loss.detach()
    else:  # each microbatch's loss on the last stage; gradients add up over microbatches
        result = pipe.step(pipe.split(p), lambda out, i: -out[0].sum() * scale)
        reported = torch.stack(result[1]).sum() if result else torch.zeros((), device=p.input_ids.device)
        dist.all_reduce(reported, group=dims.mesh("pp").get_group())  # from the last stage to every rank
    grad_norm = float(clip_grad_norm_(model.parameters(), 1.0, pp_mesh=dims.mesh("pp")))
    reported = reported / dp_mesh.size()
    dist.all_reduce(reported, group=dp_mesh.get_group())
    stepped = step_if_finite(opt, sched, float(reported), grad_norm, on_nonfinite)
    return dict(loss=float(reported), grad_norm=grad_norm, skipped=not stepped)


def open_checkpointer(args, state, log):
    """The checkpointer (or None), after restoring the newest checkpoint if `--resume`."""
    ckpt = Checkpointer(args.checkpoint_dir, args.keep_last, args.async_checkpoint) if args.checkpoint_dir else None
    if ckpt is not None and not args.resume and ckpt.steps():
        raise ValueError(f"--checkpoint-dir {args.checkpoint_dir!r} already holds checkpoints {ckpt.steps()}; "
                         "pass --resume to continue from them, or choose an empty folder")
    if args.resume:
        if ckpt is None:
            raise ValueError("--resume needs --checkpoint-dir")
        found = ckpt.load_latest(state)
        log(f"resumed from {ckpt.path(found)}" if found is not None else "no checkpoint to resume from: starting at step 1")
    return ckpt


def main(argv=None):
    args = parse_args(argv)
    device, log = setup_distributed(args.seed)
    config, tokenizer, source = model_source(args)
    model, dims, pipe = build_model(args, config, source, device)
    log(f"model: {config.num_params() / 1e6:.1f} M parameters, {config.num_hidden_layers} layers; "
        f"world {dims.world_size} on {device.type}: {dims}")

    data = batches(load_documents(args.data, tokenizer, args.max_seq_len), args.batch_tokens, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(args.warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    state = TrainState(model, opt, sched, {"step": 0})
    ckpt = open_checkpointer(args, state, log)
    start = state.extra["step"]
    for _ in range(start):  # the data position: the global batches already consumed
        next(data)
    metrics = open(args.metrics, "a" if start else "w") if args.metrics and dist.get_rank() == 0 else None

    for step in range(start + 1, args.steps + 1):
        t0 = time.perf_counter()
        batch = next(data)
        n_global = sum(len(d) - 1 for d in batch)  # next-token targets of the whole global batch
        row = train_step(model, opt, sched, local_batch(batch, dims, tokenizer, device), n_global, dims,
                         args.on_nonfinite, pipe)
        row = dict(step=step, **row, tokens_per_s=sum(map(len, batch)) / (time.perf_counter() - t0),
                   peak_mem_gib=peak_memory_gib(device))
        log(f"step {step:3d}  loss {row['loss']:.4f}  grad_norm {row['grad_norm']:.3f}  "
            f"tokens/s {row['tokens_per_s']:8.1f}  peak mem {row['peak_mem_gib']:.2f} GiB"
            + ("  (non-finite: step skipped)" if row["skipped"] else ""))
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        state.extra["step"] = step
        if ckpt is not None and (step == args.steps or (args.checkpoint_every and step % args.checkpoint_every == 0)):
            ckpt.save(step, state)
    if ckpt is not None:
        ckpt.wait()
    export(args, model, source, log)
    dist.barrier()
    dist.destroy_process_group()


def export(args, model, source, log) -> None:
    """Write the HF folder (every rank its slices) and, for a real checkpoint, sample from it with transformers."""
    if not args.export_hf:
        return
    model.save_pretrained(args.export_hf, dtype=torch.float32, source=source)
    log(f"exported Hugging Face checkpoint to {args.export_hf}")
    if dist.get_rank() == 0 and source is not None:
        greedy_sample(args.export_hf, args.prompt, args.max_new_tokens)


def greedy_sample(path: str, prompt: str, max_new_tokens: int) -> None:
    """Load the export with plain transformers and print a greedy continuation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    print("transformers greedy continuation of the exported checkpoint:")
    print(prompt + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":
    main()
