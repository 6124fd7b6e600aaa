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
import resource
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import dtllama
from dtllama.train.checkpoint import Checkpointer, TrainState, check_compatible
from dtllama.models.config import read_config_json
from dtllama.train.data import Example, Examples, balance, global_batch, microbatches
from dtllama.models.hf_io import load_state_into
from dtllama.models.llama4 import Llama4Config, Llama4ForCausalLM
from dtllama.ops import cu_seqlens_from_lengths, pad_to_multiple
from dtllama.train.optim import LR_SCHEDULES, NONFINITE_POLICIES, adamw, lr_multiplier, step_if_finite
from dtllama.parallel import AC_MODES, FSDPOptions, ParallelDims, clip_grad_norm_, parallelize
from dtllama.parallel import pp
from dtllama.parallel.pp import SCHEDULES, PipelineOptions, pipeline_llm

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "instructions.txt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", "--init-from-hf", dest="model",
                     help="Hugging Face folder to fine-tune (default: SmolLM2-135M-Instruct)")
    src.add_argument("--flavor", choices=list(dtllama.flavors),
                     help="train a randomly initialized flavor instead")
    p.add_argument("--config", help="a TOML file of these options (keys as the flags, '-' or '_'); flags override it")
    p.add_argument("--data", default=DATA,
                   help="text file (documents separated by blank lines), a folder of .txt/.jsonl files, or JSONL rows "
                        "{text}, {prompt, response} or {messages} (SFT: loss on the response / assistant tokens)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-tokens", type=int, default=1024, help="tokens per step over all data-parallel ranks")
    p.add_argument("--max-seq-len", type=int, default=512, help="longest sequence (longer ones are errors without "
                                                                "--truncate)")
    p.add_argument("--truncate", action="store_true", help="cut sequences longer than --max-seq-len")
    p.add_argument("--max-tokens-per-microbatch", type=int,
                   help="token budget of a forward/backward: a rank's sequences are packed first-fit into micro-batches "
                        "of at most this many tokens and their gradients accumulated (default: --batch-tokens)")
    p.add_argument("--dp-replicate", type=int, default=1)
    p.add_argument("--dp-shard", type=int, default=-1, help="-1: the ranks left over by the other degrees")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1, help="Ulysses context parallel degree (splits each batch's tokens)")
    p.add_argument("--ep", type=int, default=1, help="expert parallel degree (MoE models; carved from dp_shard*cp*tp)")
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
    p.add_argument("--warmup-steps", type=int, default=2, help="linear LR warm-up steps")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine", help="after warm-up: decay to the floor")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="the LR floor at the last step, as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (not on norms and biases)")
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
    p.add_argument("--tensorboard", help="also write the metrics as TensorBoard scalars to this folder (rank 0; needs "
                                         "the tensorboard package)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors (otherwise one line from rank 0)")
    return with_config_file(p, argv)


def with_config_file(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse `argv` over the defaults a `--config` TOML file sets (torchtitan's job configs); an unknown key is an
    error naming the file and the key."""
    import tomllib

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv)[0].config
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--config {path!r}: no such file")
        with open(path, "rb") as f:
            try:
                table = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not valid TOML ({e})") from None
        dests = {a.dest for a in parser._actions}
        values = {}
        for key, value in table.items():
            dest = key.replace("-", "_")
            if dest not in dests or dest in ("config", "help"):
                raise ValueError(f"{path}: unknown key {key!r}; the keys are the flags of recipes/train.py "
                                 f"({', '.join(sorted(d for d in dests if d not in ('config', 'help')))})")
            values[dest] = value
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    if args.model and args.flavor:  # one came from the file: the flag on the command line wins
        given = argv if argv is not None else sys.argv[1:]
        if "--flavor" in given:
            args.model = None
        elif not {"--model", "--init-from-hf"} & set(given):
            raise ValueError(f"{path}: sets both model and flavor; keep one")
        else:
            args.flavor = None
    return args


class ByteTokenizer:
    """UTF-8 bytes as token ids, for random flavors that have no tokenizer."""

    eos_token_id = 0

    def encode(self, text):
        return list(text.encode())


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
    log = tqdm.write if dist.get_rank() == 0 else (lambda *a, **k: None)  # above rank 0's progress bar
    return device, log


def model_source(args):
    """`(config, tokenizer, HF folder or None)`: a random flavor with byte tokens, or an HF checkpoint."""
    if args.flavor:
        flavor = dtllama.flavors[args.flavor]
        config = override(flavor, args.set)
        if config.vocab_size < 256:
            raise ValueError(f"flavor {args.flavor!r} has vocab_size={config.vocab_size} < 256 byte tokens")
        return config, ByteTokenizer(), None
    from transformers import AutoTokenizer

    source = args.model
    if source is not None and not os.path.isdir(source):
        raise FileNotFoundError(f"--model {source!r}: no such folder; pass a local Hugging Face checkpoint folder "
                                "(config.json, *.safetensors and the tokenizer files)")
    if source is None:
        from dtllama.models.pretrained import smollm2_135m_instruct

        if dist.get_rank() == 0:
            smollm2_135m_instruct()  # converts once; the other ranks wait for the cache
        dist.barrier()
        source = smollm2_135m_instruct()
    llama4 = read_config_json(source).get("model_type", "").startswith("llama4")  # text, or a multimodal one's
    config = (Llama4Config if llama4 else dtllama.ModelConfig).from_hf(source)
    return override(config, args.set), AutoTokenizer.from_pretrained(source), source


def override(config, assignments: list[str]):
    """The config with `FIELD=VALUE` overrides (VALUE read as JSON: numbers, true/false, null, else a string)."""
    fields = {f.name for f in dataclasses.fields(config)}
    changes = {}
    if isinstance(config, Llama4Config) and any(a.startswith("num_hidden_layers=") for a in assignments):
        changes.update(moe_layers=None, no_rope_layers=[])  # re-derived for the new depth unless set too
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
    dims = ParallelDims(dp_replicate=args.dp_replicate, dp_shard=args.dp_shard, cp=args.cp, tp=args.tp, pp=args.pp,
                        ep=args.ep)
    dims = dims.resolve(dist.get_world_size(), config)
    pp_options = None
    if dims.pp_enabled:
        tokens = args.microbatch_tokens or args.max_seq_len + -(-args.batch_tokens // args.microbatches)
        tokens += -tokens % dims.token_multiple
        pp_options = PipelineOptions(args.pp_schedule, args.microbatches, tokens)
        pp.check_options(config, dims, pp_options)
    if isinstance(config, Llama4Config) and dims.pp_enabled:
        raise ValueError(f"{dims}: Llama 4 models train with dp_shard, dp_replicate, cp, tp and ep here; pp is not "
                         "wired for them yet (its stages are cut from the dense model): set --pp 1")
    dims.build_mesh(device.type)
    with torch.device("meta"):
        model = (Llama4ForCausalLM if isinstance(config, Llama4Config) else dtllama.LlamaForCausalLM)(config)
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


def pack(examples: list[Example], multiple: int, device):
    """Examples as one packed batch with next-token labels, padded to a multiple of tp*cp (SP and Ulysses split T)."""
    ids = torch.tensor([t for ex in examples for t in ex.ids], device=device)
    labels = torch.tensor([t for ex in examples for t in ex.labels()], device=device)
    cu = cu_seqlens_from_lengths([len(ex.ids) for ex in examples], device=device)
    return pad_to_multiple(ids, cu, multiple, labels)


def my_microbatches(batch: list[Example], dims, max_tokens: int, filler: Example) -> list[list[Example]]:
    """This rank's micro-batches of a global batch: sequences balanced over the batch mesh (`dp_replicate x
    dp_shard`; the CP ranks of a group share theirs), packed by the token budget, and topped up with `filler`
    micro-batches to the count of the busiest rank, so that FSDP's collectives stay in step."""
    mesh = dims.mesh("batch")
    shares = [microbatches(share, max_tokens) for share in balance(batch, mesh.size())]
    mine = shares[mesh.get_local_rank()]
    return mine + [[filler]] * (max(map(len, shares)) - len(mine))


def train_step(model, opt, sched, batch: list[Example], dims, args, filler: Example, pipe=None) -> dict:
    """Forward and backward of this rank's micro-batches, clip, step; returns the loss over all ranks' loss tokens,
    the gradient norm and whether the optimizer stepped."""
    dp_mesh = dims.mesh("dp")
    device = next(model.parameters()).device
    # Sum over this rank's tokens / the global count of loss tokens, times dp: FSDP averages gradients over
    # the dp ranks (cp included: under CP the log-probs are this rank's token shard), so every token
    # weighs the same whatever rank holds it, and the result does not depend on the layout.
    scale = dp_mesh.size() / max(sum(ex.loss_tokens for ex in batch), 1)
    router = RouterTotals(dims.cp)
    if pipe is None:
        reported = torch.zeros((), device=device)
        mbs = my_microbatches(batch, dims, args.max_tokens_per_microbatch or args.batch_tokens, filler)
        for i, mb in enumerate(mbs):
            if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce-scatter once, after the last one
                model.set_requires_gradient_sync(i == len(mbs) - 1)
            p = pack(mb, dims.token_multiple, device)
            out = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=p.labels)
            loss = -out.logprobs.sum() * scale
            (loss + router.add(getattr(out, "router_stats", None), len(mbs))).backward()
            reported += loss.detach()
    else:  # the pipeline cuts its own micro-batches by its token budget; gradients add up over them
        shares = balance(batch, dims.mesh("batch").size())
        p = pack(shares[dims.mesh("batch").get_local_rank()] or [filler], dims.token_multiple, device)
        result = pipe.step(pipe.split(p), lambda out, i: -out[0].sum() * scale)
        reported = torch.stack(result[1]).sum() if result else torch.zeros((), device=device)
        dist.all_reduce(reported, group=dims.mesh("pp").get_group())  # from the last stage to every rank
    grad_norm = float(clip_grad_norm_(model.parameters(), 1.0, pp_mesh=dims.mesh("pp")))
    reported = reported / dp_mesh.size()
    dist.all_reduce(reported, group=dp_mesh.get_group())
    stepped = step_if_finite(opt, sched, float(reported), grad_norm, args.on_nonfinite)
    return dict(loss=float(reported), grad_norm=grad_norm, skipped=not stepped, **router.metrics())


class RouterTotals:
    """A MoE model's router statistics over a step's micro-batches: tokens per expert (summed over MoE layers, then
    over all ranks: data-parallel ranks hold other sequences, TP ranks other token shards) and the mean load-balance
    loss, which joins the training loss (the LM `loss`
    metric stays without it). Empty for dense models.

    Under Ulysses every CP rank computes its group's one load-balance loss and back-propagates into its own tokens,
    while FSDP averages gradients over the CP ranks too: the loss is scaled by `cp` to undo that (as the LM loss is
    by the dp size)."""

    def __init__(self, cp: int = 1):
        self.counts, self.aux, self.n, self.cp = None, 0.0, 0, cp

    def add(self, stats, n_microbatches: int):
        """Record one micro-batch's stats; returns what to add to its loss (its share of the step's aux loss)."""
        if stats is None:
            return 0.0
        counts = stats.tokens_per_expert.sum(0)
        self.counts = counts if self.counts is None else self.counts + counts
        if stats.aux_loss is None:
            return 0.0
        self.aux, self.n = self.aux + float(stats.aux_loss.detach()), self.n + 1
        return stats.aux_loss * self.cp / n_microbatches

    def metrics(self) -> dict:
        if self.counts is None:
            return {}
        dist.all_reduce(self.counts)
        out = {"tokens_per_expert": self.counts.tolist(),
               "expert_load_max_over_mean": float(self.counts.max() / self.counts.float().mean().clamp_min(1))}
        if self.n:
            out["aux_loss"] = self.aux / self.n
        return out


def open_checkpointer(args, state, log):
    """The checkpointer (or None), after restoring the newest checkpoint if `--resume`."""
    ckpt = Checkpointer(args.checkpoint_dir, args.keep_last, args.async_checkpoint) if args.checkpoint_dir else None
    if ckpt is not None and not args.resume and ckpt.steps():
        raise ValueError(f"--checkpoint-dir {args.checkpoint_dir!r} already holds checkpoints {ckpt.steps()}; "
                         "pass --resume to continue from them, or choose an empty folder")
    if args.resume:
        if ckpt is None:
            raise ValueError("--resume needs --checkpoint-dir")
        if ckpt.steps():
            check_compatible(ckpt.path(ckpt.steps()[-1]), state.model)
        found = ckpt.load_latest(state)
        log(f"resumed from {ckpt.path(found)}" if found is not None else "no checkpoint to resume from: starting at step 1")
    return ckpt


def tensorboard(folder: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ModuleNotFoundError("--tensorboard needs the tensorboard package: pip install tensorboard "
                                  "(or dtllama[tensorboard])") from None
    return SummaryWriter(folder)


def step_flops(config, batch: list[Example]) -> float:
    """Training FLOPs of a step, torchtitan's count: 6 per parameter and token (embedding excluded) plus causal
    attention's 12 * layers * hidden per token pair of each sequence."""
    h, L = config.hidden_size, config.num_hidden_layers
    active = config.num_params(active=True) if isinstance(config, Llama4Config) else config.num_params()  # MoE: top-k
    dense = 6 * (active - config.vocab_size * h) * sum(len(ex.ids) for ex in batch)
    return dense + 12 * L * h * sum(len(ex.ids) ** 2 for ex in batch)


PEAK_FLOPS = 989e12  # bf16 dense, H100/H200 SXM: the MFU reference


def main(argv=None):
    args = parse_args(argv)
    device, log = setup_distributed(args.seed)
    config, tokenizer, source = model_source(args)
    model, dims, pipe = build_model(args, config, source, device)
    log(f"model: {config.num_params() / 1e6:.1f} M parameters, {config.num_hidden_layers} layers; "
        f"world {dims.world_size} on {device.type}: {dims}")

    examples = Examples(args.data, tokenizer, args.max_seq_len, config.vocab_size, args.seed, args.truncate)
    filler = Example([tokenizer.eos_token_id], [False], "(filler)")  # a micro-batch of no loss tokens
    opt = adamw(model, args.lr, args.weight_decay)
    warmup = max(args.warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: lr_multiplier(i, warmup, args.steps, args.lr_schedule, args.min_lr_ratio))
    state = TrainState(model, opt, sched, {"step": 0, "data_position": 0})
    ckpt = open_checkpointer(args, state, log)
    start = state.extra["step"]
    examples.skip(state.extra.get("data_position", 0))  # the examples the resumed run already trained on
    metrics = open(args.metrics, "a" if start else "w") if args.metrics and dist.get_rank() == 0 else None
    board = tensorboard(args.tensorboard) if args.tensorboard and dist.get_rank() == 0 else None
    progress = tqdm(total=args.steps, initial=start, disable=dist.get_rank() != 0, unit="step", dynamic_ncols=True)
    t_start, tokens_seen = time.perf_counter(), 0
    for step in range(start + 1, args.steps + 1):
        t0 = time.perf_counter()
        batch = global_batch(examples, args.batch_tokens)
        lr = sched.get_last_lr()[0]
        row = train_step(model, opt, sched, batch, dims, args, filler, pipe)
        dt = time.perf_counter() - t0
        tokens = sum(len(ex.ids) for ex in batch)
        tokens_seen += tokens
        mfu = step_flops(config, batch) / dt / (PEAK_FLOPS * dims.world_size) if device.type == "cuda" else None
        row = dict(step=step, **row, tokens_per_s=tokens / dt, peak_mem_gib=peak_memory_gib(device), lr=lr, mfu=mfu,
                   tokens=tokens, loss_tokens=sum(ex.loss_tokens for ex in batch))
        log(f"step {step:3d}  loss {row['loss']:.4f}  grad_norm {row['grad_norm']:.3f}  lr {lr:.2e}  "
            f"tokens/s {row['tokens_per_s']:8.1f}" + (f"  MFU {mfu:.1%}" if mfu is not None else "")
            + f"  peak mem {row['peak_mem_gib']:.2f} GiB" + ("  (non-finite: step skipped)" if row["skipped"] else "")
            + (f"  expert load max/mean {row['expert_load_max_over_mean']:.2f}" if "tokens_per_expert" in row else ""))
        progress.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        progress.update()
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        if board:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    board.add_scalar(f"train/{key}", value, step)
        state.extra.update(step=step, data_position=examples.position)
        if ckpt is not None and (step == args.steps or (args.checkpoint_every and step % args.checkpoint_every == 0)):
            ckpt.save(step, state)
    progress.close()
    if board:
        board.close()
    if ckpt is not None:
        ckpt.wait()
    elapsed = time.perf_counter() - t_start
    log(f"trained steps {start + 1}-{args.steps}: {tokens_seen} tokens in {elapsed:.1f} s "
        f"({tokens_seen / max(elapsed, 1e-9):.0f} tokens/s)")
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


def run(argv=None) -> None:
    """`main`, with the errors a user can fix printed as one line by rank 0 and a non-zero exit (`--debug`: raise)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        if "--debug" in argv:
            raise
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
