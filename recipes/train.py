"""Fine-tune a Llama-family model with FSDP2 on packed batches; run under torchrun.

    torchrun --standalone --nproc-per-node 2 recipes/train.py          # SmolLM2-135M-Instruct, built-in corpus
    torchrun --standalone --nproc-per-node 2 recipes/train.py --flavor debug   # random tiny model, bytes
    torchrun --standalone --nproc-per-node 4 recipes/train.py --flavor debug --dp-shard 2 --tp 2 --ac full
    torchrun --standalone --nproc-per-node 4 recipes/train.py --flavor debug --cp 2 --tp 2   # Ulysses x TP
    torchrun --standalone --nproc-per-node 2 recipes/train.py --flavor debug --set num_hidden_layers=8 \\
        --pp 2 --pp-schedule Interleaved1F1B --microbatches 4                                  # pipeline
    torchrun --standalone --nproc-per-node 2 recipes/train.py --flavor llama4-debug --ep 2      # MoE, experts split

The model is built on the meta device, cut into pipeline stages when `--pp` > 1, parallelized (TP/SP, EP, Ulysses
CP, activation checkpointing, compile, FSDP2/HSDP), then materialized and initialized or loaded from the HF folder,
each rank reading only its own shards (`dtllama.train.build`). A step's global batch is the same for every layout:
sequences are drawn in one global order up to `--batch-tokens`, and rank r of the batch mesh (`dp_replicate x
dp_shard`) takes every n-th of them; the `cp` ranks of a group share those sequences, each running its token shard.

Each step prints the loss (mean over all real tokens of all ranks), tokens/s and peak memory. At the end the model
is exported as a Hugging Face folder, which `transformers` then loads to print a greedy continuation of a prompt.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import dtllama
from dtllama.train.build import build_model, pipeline_options, resolve_layout, setup_distributed
from dtllama.train.checkpoint import TrainState
from dtllama.train.config import TrainConfig, parse_args
from dtllama.train.data import Example, Examples, global_batch
from dtllama.train.launch import run_recipe
from dtllama.train.loop import open_checkpointer, optimizer, save_due, train_step
from dtllama.train.metrics import MetricsWriter, mfu, peak_memory_gib, step_flops
from dtllama.train.source import load_source
from dtllama.train.watchdog import Watchdog

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "instructions.txt")


def main(argv=None):
    cfg = parse_args(argv, description=__doc__, prog="recipes/train.py", defaults=dict(data=DATA))
    device, log = setup_distributed(cfg.seed, cfg.timeout)
    config, tokenizer, source = load_source(cfg.source)
    dims = resolve_layout(cfg.layout, config)  # before any collective can hang on a bad degree
    pipeline = pipeline_options(cfg.layout, dims, config, cfg.training.pipeline_tokens(cfg.layout.microbatches))
    dims.build_mesh(device.type)
    built = build_model(dtllama.model_class(config), config, dims, cfg.layout, device, pipeline=pipeline,
                        source=source, seed=cfg.seed, param_dtype=torch.bfloat16 if device.type == "cuda" else None)
    model = built.model
    log(f"model: {config.num_params() / 1e6:.1f} M parameters, {config.num_hidden_layers} layers; "
        f"world {dims.world_size} on {device.type}: {dims}")

    t = cfg.training
    examples = Examples(t.data, tokenizer, t.max_seq_len, config.vocab_size, cfg.seed, t.truncate)
    filler = Example([tokenizer.eos_token_id], [False], "(filler)")  # a micro-batch of no loss tokens
    opt, sched = optimizer(model, cfg.optim, t.steps)
    state = TrainState(model, opt, sched, {"step": 0, "data_position": 0})
    ckpt = open_checkpointer(cfg.checkpoint, state, log)
    start = state.extra["step"]
    examples.skip(state.extra.get("data_position", 0))  # the examples the resumed run already trained on
    metrics = MetricsWriter(cfg.metrics, cfg.tensorboard, append=start > 0)
    progress = tqdm(total=t.steps, initial=start, disable=dist.get_rank() != 0, unit="step", dynamic_ncols=True)
    t_start, tokens_seen = time.perf_counter(), 0
    watchdog = Watchdog(cfg.timeout)
    for step in range(start + 1, t.steps + 1):
        with watchdog.step(step):  # a collective that times out names the rank it waited for
            t0 = time.perf_counter()
            batch = global_batch(examples, t.batch_tokens)
            lr = sched.get_last_lr()[0]
            row = train_step(model, opt, sched, batch, dims, filler, t, cfg.optim, built.pipe)
            row = report(step, row, batch, time.perf_counter() - t0, lr, config, dims, device, log)
            tokens_seen += row["tokens"]
            progress.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            progress.update()
            metrics.write(row)
            state.extra.update(step=step, data_position=examples.position)
            if ckpt is not None and save_due(cfg.checkpoint, step, t.steps):
                ckpt.save(step, state)
    progress.close()
    metrics.close()
    if ckpt is not None:
        ckpt.wait()
    elapsed = time.perf_counter() - t_start
    log(f"trained steps {start + 1}-{t.steps}: {tokens_seen} tokens in {elapsed:.1f} s "
        f"({tokens_seen / max(elapsed, 1e-9):.0f} tokens/s)")
    export(cfg, model, source, log)
    watchdog.close()
    dist.barrier()
    dist.destroy_process_group()


def report(step: int, row: dict, batch: list[Example], dt: float, lr: float, config, dims, device, log) -> dict:
    """The step's metrics row (throughput, memory, MFU on GPU), printed as one line."""
    lengths = [len(ex.ids) for ex in batch]
    tokens = sum(lengths)
    util = mfu(step_flops(config, lengths), dt, dims.world_size, device)
    row = dict(step=step, **row, tokens_per_s=tokens / dt, peak_mem_gib=peak_memory_gib(device), lr=lr, mfu=util,
               tokens=tokens, loss_tokens=sum(ex.loss_tokens for ex in batch))
    log(f"step {step:3d}  loss {row['loss']:.4f}  grad_norm {row['grad_norm']:.3f}  lr {lr:.2e}  "
        f"tokens/s {row['tokens_per_s']:8.1f}" + (f"  MFU {util:.1%}" if util is not None else "")
        + f"  peak mem {row['peak_mem_gib']:.2f} GiB" + ("  (non-finite: step skipped)" if row["skipped"] else "")
        + (f"  expert load max/mean {row['expert_load_max_over_mean']:.2f}" if "tokens_per_expert" in row else ""))
    return row


def export(cfg: TrainConfig, model, source: str | None, log) -> None:
    """Write the HF folder (every rank its slices) and, for a real checkpoint, sample from it with transformers."""
    if not cfg.export_hf:
        return
    model.save_pretrained(cfg.export_hf, dtype=torch.float32, source=source)
    log(f"exported Hugging Face checkpoint to {cfg.export_hf}")
    if dist.get_rank() == 0 and source is not None:
        greedy_sample(cfg.export_hf, cfg.prompt, cfg.max_new_tokens)


def greedy_sample(path: str, prompt: str, max_new_tokens: int) -> None:
    """Load the export with plain transformers and print a greedy continuation (of text: a VL model too)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    vision = getattr(transformers.AutoConfig.from_pretrained(path), "vision_config", None) is not None
    auto = transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM
    hf = auto.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    print("transformers greedy continuation of the exported checkpoint:")
    print(prompt + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":
    run_recipe(main)
