"""Fine-tune a Llama-family model with FSDP2 on packed batches; run under torchrun.

    torchrun --nproc-per-node 2 recipes/train.py                 # SmolLM2-135M-Instruct, built-in corpus
    torchrun --nproc-per-node 2 recipes/train.py --flavor debug  # random tiny model, byte tokens

Each step prints the loss (mean over all real tokens of all ranks), tokens/s and peak memory. At the
end the model is exported as a Hugging Face folder, which `transformers` then loads to print a
greedy continuation of a prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import dtllama
from dtllama.ops import IGNORE_INDEX, cu_seqlens_from_lengths, shift_labels
from dtllama.parallel import apply_fsdp

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "instructions.txt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="Hugging Face folder to fine-tune (default: SmolLM2-135M-Instruct)")
    src.add_argument("--flavor", choices=list(dtllama.flavors), help="train a randomly initialized flavor instead")
    p.add_argument("--data", default=DATA, help="text file, documents separated by blank lines")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--tokens-per-rank", type=int, default=512, help="packed tokens per rank per step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export-hf", default="out/finetuned", help="folder for the exported HF checkpoint ('' to skip)")
    p.add_argument("--prompt", default="Question: What is the capital of France?\nAnswer:")
    p.add_argument("--max-new-tokens", type=int, default=24)
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


def batches(docs, tokens_per_rank: int, rank: int, world: int, seed: int):
    """Endless packed batches: each rank fills its budget from its own share of a shuffled epoch."""
    epoch = 0
    while True:
        order = list(range(len(docs)))
        random.Random(seed + epoch).shuffle(order)
        mine = [docs[i] for i in order[rank::world]]
        batch = []
        for doc in mine:
            if batch and sum(map(len, batch)) + len(doc) > tokens_per_rank:
                yield batch
                batch = []
            batch.append(doc)
        if batch:
            yield batch
        epoch += 1


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    log = print if rank == 0 else (lambda *a, **k: None)

    if args.flavor:
        config = dtllama.flavors[args.flavor]
        model = dtllama.LlamaForCausalLM(config).to(device)
        model.init_weights(args.seed)
        tokenizer, source = ByteTokenizer(), None
        if config.vocab_size < 256:
            raise ValueError(f"flavor {args.flavor!r} has vocab_size={config.vocab_size} < 256 byte tokens")
    else:
        from transformers import AutoTokenizer

        source = args.model
        if source is None:
            from dtllama.pretrained import smollm2_135m_instruct

            if rank == 0:
                smollm2_135m_instruct()  # converts once; the other ranks wait for the cache
            dist.barrier()
            source = smollm2_135m_instruct()
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = dtllama.LlamaForCausalLM.from_pretrained(source, device=device)
    config = model.config
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp_shard",))
    apply_fsdp(model, mesh, param_dtype=torch.bfloat16 if cuda else None)
    n_params = config.num_params()
    log(f"model: {n_params / 1e6:.1f} M parameters, {config.num_hidden_layers} layers; world {world} on {device.type}")

    docs = load_documents(args.data, tokenizer, args.tokens_per_rank)
    data = batches(docs, args.tokens_per_rank, rank, world, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    metrics = open(args.metrics, "w") if args.metrics and rank == 0 else None

    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        seqs = next(data)
        ids = torch.tensor([t for s in seqs for t in s], device=device)
        cu = cu_seqlens_from_lengths([len(s) for s in seqs], device=device)
        labels = shift_labels(ids, cu)
        n_local = (labels != IGNORE_INDEX).sum()
        n_global = n_local.clone().float()
        dist.all_reduce(n_global)
        out = model(ids, cu_seqlens=cu, labels=labels)
        # Sum over this rank's tokens / global token count: FSDP's gradient averaging over ranks is
        # undone by the world factor, so every token weighs the same whatever rank holds it.
        loss = -out.logprobs.sum() / n_global * world
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        reported = loss.detach() / world
        dist.all_reduce(reported)
        tokens = torch.tensor(float(ids.numel()), device=device)
        dist.all_reduce(tokens)
        dt = time.perf_counter() - t0
        row = dict(step=step, loss=float(reported), grad_norm=float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                   tokens_per_s=float(tokens) / dt, peak_mem_gib=peak_memory_gib(device))
        log(f"step {step:3d}  loss {row['loss']:.4f}  grad_norm {row['grad_norm']:.3f}  "
            f"tokens/s {row['tokens_per_s']:8.1f}  peak mem {row['peak_mem_gib']:.2f} GiB")
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    if args.export_hf:
        model.save_pretrained(args.export_hf, dtype=torch.float32, source=source)
        log(f"exported Hugging Face checkpoint to {args.export_hf}")
        if rank == 0 and source is not None:
            greedy_sample(args.export_hf, args.prompt, args.max_new_tokens)
    dist.barrier()
    dist.destroy_process_group()


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
