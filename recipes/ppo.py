"""PPO actor-critic updates on packed prompt + response batches; run under torchrun.

    torchrun --standalone --nproc-per-node 1 recipes/ppo.py                        # debug flavor, byte tokens
    torchrun --standalone --nproc-per-node 2 recipes/ppo.py --tp 2
    torchrun --standalone --nproc-per-node 4 recipes/ppo.py --dp-shard 2 --tp 2 --advantage grpo
    torchrun --standalone --nproc-per-node 2 recipes/ppo.py --cp 2                 # Ulysses
    torchrun --standalone --nproc-per-node 4 recipes/ppo.py --pp 2 --tp 2 --set num_hidden_layers=4   # pipeline
    torchrun --standalone --nproc-per-node 2 recipes/ppo.py --model path/to/hf-folder   # real weights

Task (rule-based, no reward model): the prompt is "a+b=" for a, b in [0, 20); the reward is the
fraction of the answer's digits that the response gets right, in place (1.0 for "7" after "3+4=").

One iteration: every rank of the batch mesh (`dp_replicate x dp_shard`) takes its share of the global
prompts, samples `--group-size` responses per prompt (at most `--max-new-tokens`, stop at eos) from the
actor's logits, packs prompt + response per sequence, records the actor's log-probs ("old"), the
frozen reference's log-probs and the critic's values, computes advantages (GAE, or GRPO's group
normalization), then runs `--ppo-epochs` epochs over the batch (one minibatch: the rank's whole batch):
clipped policy loss + `--vf-coef` x clipped value loss + `--kl-coef` x KL(actor || ref) (k1/k3)
- `--entropy-coef` x entropy, on response tokens only, normalized by the global response-token (or
sequence) count so that every token weighs the same on any mesh.

Exactness: the first epoch's forward is the rollout's forward on the same weights and the same packed
batch, so its log-probs must equal the recorded ones bitwise (ratio exactly 1, approx-KL exactly 0);
the recipe asserts it every iteration on every rank.

Under TP the logits used for sampling are gathered to the full vocabulary on every rank
(`linear_logits` returns `full_tensor()`), so the ranks of a TP group hold identical logits and, with
identically seeded generators, sample identical tokens; the recipe checks that once per iteration.
Under context parallelism (Ulysses) each CP rank's forward returns its token shard; the recipe gathers the
shards (`gather_tokens`, differentiable), so that every CP rank of a group holds the whole batch's log-probs
and values, computes the same advantages and losses over whole sequences as one device would, and sends
back only its own tokens' gradients.
Under pipeline parallelism (`--pp`) actor, reference and critic are each cut into stages; sampling runs the
actor's stages for logits, the last stage's outputs (logits, log-probs, values) are shared with every
pipeline rank, and each update is one schedule step whose per-microbatch loss is the batch loss's share
(`dtllama.train.runner`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dtllama  # noqa: E402
from dtllama.train import rl  # noqa: E402
from dtllama.models.hf_io import load_state_into  # noqa: E402
from dtllama.ops import Packed, cu_seqlens_from_lengths, pad_to_multiple, shift_labels  # noqa: E402
from dtllama.parallel import ParallelDims, clip_grad_norm_, parallelize  # noqa: E402
from dtllama.parallel.pp import SCHEDULES, PipelineOptions, check_options, pipeline_llm  # noqa: E402
from dtllama.train.runner import PipelineRunner, WholeRunner  # noqa: E402
from train import ByteTokenizer, override, setup_distributed  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="Hugging Face folder for actor, reference and critic backbone")
    src.add_argument("--flavor", choices=list(dtllama.flavors), default="debug", help="random init (byte tokens)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field of --flavor, e.g. --set num_hidden_layers=4 (repeatable)")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8, help="prompts per iteration over all data-parallel ranks")
    p.add_argument("--group-size", type=int, default=2, help="responses sampled per prompt")
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--advantage", choices=("gae", "grpo"), default="gae")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.95)
    p.add_argument("--clip-low", type=float, default=0.2)
    p.add_argument("--clip-high", type=float, default=0.28)
    p.add_argument("--value-clip", type=float, default=0.5)
    p.add_argument("--agg", choices=rl.AGG_MODES, default="token-mean")
    p.add_argument("--kl-kind", choices=rl.KL_KINDS, default="k3")
    p.add_argument("--kl-coef", type=float, default=0.01)
    p.add_argument("--vf-coef", type=float, default=0.5)
    p.add_argument("--entropy-coef", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-4, help="actor learning rate")
    p.add_argument("--critic-lr", type=float, default=1e-3)
    p.add_argument("--dp-replicate", type=int, default=1)
    p.add_argument("--dp-shard", type=int, default=-1, help="-1: the ranks left over by the other degrees")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1, help="Ulysses context parallel degree")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel degree")
    p.add_argument("--pp-schedule", default="1F1B", choices=list(SCHEDULES), help="pipeline schedule (with --pp > 1)")
    p.add_argument("--microbatches", type=int, default=2, help="pipeline microbatches of a rank's batch")
    p.add_argument("--microbatch-tokens", type=int,
                   help="tokens per pipeline microbatch (default: enough for a rank's longest possible batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", help="write per-iteration metrics as JSON lines to this file (rank 0)")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.group_size < 1 or args.max_new_tokens < 1 or args.ppo_epochs < 1:
        p.error("--prompts, --group-size, --max-new-tokens and --ppo-epochs must be >= 1")
    if args.set and args.model:
        p.error("--set overrides a --flavor's config; a --model folder's config.json is its own")
    if args.advantage == "grpo" and args.group_size < 2:
        p.error("--advantage grpo needs --group-size >= 2 (a group of one has no baseline)")
    return args


# ----------------------------------------------------------------------------------------------- task


def make_prompts(iteration: int, n: int, seed: int) -> list[tuple[int, int]]:
    """The global prompts of an iteration: the same on every rank."""
    rng = random.Random(seed * 1_000_003 + iteration)
    return [(rng.randrange(20), rng.randrange(20)) for _ in range(n)]


def reward(a: int, b: int, response: str) -> float:
    """Fraction of the digits of a+b that the response has in place: a dense signal for a tiny model."""
    answer = str(a + b)
    return sum(x == y for x, y in zip(answer, response)) / len(answer)


class HFTokenizer:
    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.eos_token_id = self.tok.eos_token_id

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)


def decode_bytes(ids: list[int]) -> str:
    """Byte tokens back to text; ids >= 256 (the debug vocab has 512) and eos become nothing."""
    return bytes(i for i in ids if 0 < i < 256).decode(errors="replace")


# ------------------------------------------------------------------------------------------- models


def build(cls, config, dims, source, seed, device, pp_options):
    """Meta -> pipeline stages (pp > 1) -> parallelize -> materialize -> init from the seed or load the HF folder;
    returns the model's runner (`dtllama.train.runner`: all tokens' outputs on every rank, whole or pipelined)."""
    with torch.device("meta"):
        model = cls(config)
    if dims.pp_enabled:
        pipe = pipeline_llm(model, dims, pp_options, device)
        pipe.to_empty(device)
        model, run = pipe.model, PipelineRunner(pipe, dims)
    else:
        parallelize(model, dims)
        model.to_empty(device=device)
        run = WholeRunner(model, dims)
    if source is None:
        model.init_weights(seed)
    else:
        load_state_into(model, source)
    return run


def pack(seqs: list[list[int]], dims, device, labels: bool) -> Packed:
    ids = torch.tensor([t for s in seqs for t in s], device=device)
    cu = cu_seqlens_from_lengths([len(s) for s in seqs], device=device)
    b = pad_to_multiple(ids, cu, dims.token_multiple, shift_labels(ids, cu) if labels else None)
    return b if labels else dataclasses.replace(b, labels=None)  # no labels: the causal LM returns logits


@torch.no_grad()
def sample(actor, prompts: list[list[int]], max_new: int, eos: int, gen: torch.Generator, dims, device):
    """Sample responses token by token from the full-vocab logits of each sequence's last token.

    Every rank runs exactly `max_new` forwards (finished sequences ride along), so FSDP's all-gathers
    and the batch check's all-reduce line up on every rank whatever its sequences do. The logits are the same
    on every rank of a TP / CP / pipeline group (gathered or shared), so with one seed they sample alike.
    """
    responses = [[] for _ in prompts]
    for _ in range(max_new):
        seqs = [p + r for p, r in zip(prompts, responses)]
        b = pack(seqs, dims, device, labels=False)
        logits = actor(b)
        last = b.cu_seqlens[1:len(seqs) + 1].long() - 1
        tokens = torch.multinomial(torch.softmax(logits[last].float(), -1).cpu(), 1, generator=gen).squeeze(1)
        for r, t in zip(responses, tokens.tolist()):
            if not r or r[-1] != eos:
                r.append(t)
    return responses


def pipeline_options(args, dims, config, tokenizer, n_batch: int) -> PipelineOptions | None:
    """Under pp: microbatches whose token budget fits a rank's batch at its longest (every prompt "19+19=" long,
    every response `--max-new-tokens`), checked against the layout before any collective."""
    if not dims.pp_enabled:
        return None
    seqs = -(-args.prompts // n_batch) * args.group_size
    longest = len(tokenizer.encode("19+19=")) + args.max_new_tokens
    # First-fit of sequences of at most `longest` tokens into `microbatches` bins fits once each bin can take
    # its even share plus one more sequence, and the padding tail (pad_to_multiple) one token under tp*cp.
    tokens = args.microbatch_tokens or (-(-seqs // args.microbatches) + 1) * longest + dims.token_multiple
    tokens += -tokens % dims.token_multiple
    options = PipelineOptions(args.pp_schedule, args.microbatches, tokens)
    check_options(config, dims, options)
    return options


# --------------------------------------------------------------------------------------------- step


def rollout(args, it, actor, ref, critic, dims, tokenizer, device, decode):
    """This rank's packed batch with response mask, old/ref log-probs, values, rewards and advantages."""
    rank, n = dims.mesh("batch").get_local_rank(), dims.mesh("batch").size()
    prompts = make_prompts(it, args.prompts, args.seed)[rank::n]  # non-empty: main checked --prompts >= n
    expanded = [ab for ab in prompts for _ in range(args.group_size)]
    prompt_ids = [tokenizer.encode(f"{a}+{b}=") for a, b in expanded]
    # Same seed on the TP ranks of a group (they must sample the same tokens), another per batch rank.
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + it * 1009 + rank)
    responses = sample(actor, prompt_ids, args.max_new_tokens, tokenizer.eos_token_id, gen, dims, device)
    for name in ("tp", "cp", "pp"):
        if getattr(dims, f"{name}_enabled"):
            got = [None] * getattr(dims, name)
            dist.all_gather_object(got, responses, group=dims.mesh(name).get_group())
            assert all(g == responses for g in got), f"{name.upper()} ranks sampled different tokens"
    seqs = [p + r for p, r in zip(prompt_ids, responses)]
    b = pack(seqs, dims, device, labels=True)
    # labels[t] is token t+1: the response tokens are read at positions len(prompt)-1 .. len(seq)-2.
    mask = torch.zeros_like(b.input_ids, dtype=torch.float32)
    start = 0
    for p, s in zip(prompt_ids, seqs):
        mask[start + len(p) - 1: start + len(s) - 1] = 1
        start += len(s)
    scores = torch.tensor([reward(a, bb, decode(r)) for (a, bb), r in zip(expanded, responses)])
    old, ref_lp, values = actor(b)[0], ref(b)[0], critic(b)
    cu = b.cu_seqlens[: len(seqs) + 1]  # the real sequences (the padding tail has no response tokens)
    real = int(cu[-1])
    if args.advantage == "gae":
        token_rewards = torch.zeros_like(mask)
        token_rewards[cu[1:].long() - 2] = scores  # at the last response token (read at its sequence's end - 2)
        adv, ret = rl.gae_advantages(token_rewards[:real], values[:real], mask[:real], cu, args.gamma, args.lam)
        adv, ret = _pad(adv, mask), _pad(ret, mask)
    else:
        group = torch.arange(len(prompts)).repeat_interleave(args.group_size)
        adv = _pad(rl.broadcast_to_tokens(rl.grpo_advantages(scores, group), mask[:real], cu), mask)
        # GRPO needs no critic; it still learns the Monte-Carlo return (the score, gamma = 1) for the metrics.
        ret = _pad(rl.broadcast_to_tokens(scores, mask[:real], cu), mask)
    return dict(batch=b, mask=mask, old=old, ref=ref_lp, values=values, adv=adv, ret=ret, scores=scores,
                responses=[decode(r) for r in responses[: 2]])


def _pad(x, like):
    """A tensor of the real tokens, zero-extended to the padded length."""
    return torch.cat([x, x.new_zeros(like.shape[0] - x.shape[0])])


def ppo_epochs(args, roll, actor, critic, opts, dims) -> dict:
    """`--ppo-epochs` epochs over the rank's batch; returns per-epoch global losses and first-epoch metrics.

    Actor and critic each take one forward + backward per epoch (under pp, one schedule step over the batch's
    microbatches), with the loss of the tokens `take` cuts from the rollout's per-token tensors; the logged terms
    are recomputed from the returned outputs over the whole batch."""
    actor_opt, critic_opt = opts
    b, mask = roll["batch"], roll["mask"]
    dp, batch_mesh = dims.mesh("dp"), dims.mesh("batch")
    # The normalizer spans ranks: the global count of response tokens (or sequences), all-reduced once over the
    # batch mesh (the CP and pipeline ranks of a group hold the same, whole sequences).
    n_seqs = float(len(roll["scores"]))
    counts = torch.tensor([float(mask.sum()), n_seqs], dtype=torch.float64)
    dist.all_reduce(counts, group=batch_mesh.get_group())
    norm = float(counts[0] if args.agg == "token-mean" else counts[1])
    # FSDP averages gradients over dp (cp included): undo it, each term is already global (and each CP rank's
    # backward covers its own tokens only).
    scale = dp.size()

    def actor_loss(out, take, cu):
        (lp, ent), m = out, take(mask)
        if not bool(m.any()):  # a pipeline microbatch without responses (first-fit filled the others)
            return lp.sum() * 0.0
        pg = rl.policy_loss(lp, take(roll["old"]), take(roll["adv"]), m, args.clip_low, args.clip_high, args.agg,
                            cu, norm)[0]
        kl = rl.aggregate(rl.kl_penalty(lp, take(roll["ref"]), args.kl_kind), m, args.agg, cu, norm)
        return (pg + args.kl_coef * kl - args.entropy_coef * rl.entropy_bonus(ent, m, args.agg, cu, norm)) * scale

    def critic_loss(values, take, cu):
        if not bool(take(mask).any()):
            return values.sum() * 0.0
        vf = rl.value_loss(values, take(roll["values"]), take(roll["ret"]), take(mask), args.value_clip, args.agg,
                           cu, norm)[0]
        return args.vf_coef * vf * scale

    out_rows = []
    for epoch in range(args.ppo_epochs):
        logprobs, entropy = actor.train(b, actor_loss)
        values = critic.train(b, critic_loss)
        cu = b.cu_seqlens
        pg, m = rl.policy_loss(logprobs, roll["old"], roll["adv"], mask, args.clip_low, args.clip_high,
                               args.agg, cu, norm)
        if epoch == 0:
            # Same weights, same batch, same forward: the recomputed log-probs are the recorded ones, bitwise.
            exact = torch.equal(logprobs, roll["old"])
            if not exact or m["ratio_max_dev"] != 0.0 or m["approx_kl"] != 0.0:
                raise AssertionError(f"rank {dist.get_rank()}: first-minibatch log-probs differ from the rollout's: "
                                     f"max |ratio - 1| = {m['ratio_max_dev']}, approx-KL = {m['approx_kl']}")
            first = dict(m, exact=exact)
        vf, vm = rl.value_loss(values, roll["values"], roll["ret"], mask, args.value_clip, args.agg, cu, norm)
        kl = rl.aggregate(rl.kl_penalty(logprobs, roll["ref"], args.kl_kind), mask, args.agg, cu, norm)
        ent = rl.entropy_bonus(entropy, mask, args.agg, cu, norm)
        for run, opt in ((actor, actor_opt), (critic, critic_opt)):
            clip_grad_norm_(run.parameters(), 1.0, pp_mesh=dims.mesh("pp"))
            opt.step()
            opt.zero_grad()
        row = torch.stack([pg, vf, kl, ent]).double()
        dist.all_reduce(row, group=batch_mesh.get_group())  # each term is a partial sum of the global mean
        if epoch == 0:
            first.update(vm)
        out_rows.append(row.tolist())
    return dict(first=first, rows=out_rows)


def mean_over(x: float, mesh) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, group=mesh.get_group())
    return float(t) / mesh.size()


def main(argv=None):
    args = parse_args(argv)
    device, log = setup_distributed(args.seed)
    if args.model:
        config, tokenizer, source = dtllama.ModelConfig.from_hf(args.model), HFTokenizer(args.model), args.model
        decode = tokenizer.decode
    else:
        config, tokenizer, source = override(dtllama.flavors[args.flavor], args.set), ByteTokenizer(), None
        decode = decode_bytes
    dims = ParallelDims(dp_replicate=args.dp_replicate, dp_shard=args.dp_shard, cp=args.cp, tp=args.tp, pp=args.pp)
    dims = dims.resolve(dist.get_world_size(), config)
    n_batch = dims.dp_replicate * dims.dp_shard
    if args.prompts < n_batch:  # before any collective: every batch rank needs a prompt
        raise ValueError(f"--prompts {args.prompts} < {n_batch} data-parallel ranks; "
                         "give every rank at least one prompt (raise --prompts or lower --dp-shard)")
    pp_options = pipeline_options(args, dims, config, tokenizer, n_batch)
    dims.build_mesh(device.type)
    actor = build(dtllama.LlamaForCausalLM, config, dims, source, args.seed, device, pp_options)
    ref = build(dtllama.LlamaForCausalLM, config, dims, source, args.seed, device, pp_options)
    critic = build(dtllama.LlamaForValue, config, dims, source, args.seed, device, pp_options)
    opts = (torch.optim.AdamW(actor.parameters(), lr=args.lr, weight_decay=0.0),
            torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, weight_decay=0.0))
    log(f"PPO: {config.num_params() / 1e6:.1f} M parameters per model; world {dims.world_size}: {dims}; "
        f"advantage {args.advantage}, agg {args.agg}, KL {args.kl_kind}")
    metrics = open(args.metrics, "w") if args.metrics and dist.get_rank() == 0 else None
    dp, batch_mesh = dims.mesh("dp"), dims.mesh("batch")
    for it in range(1, args.iterations + 1):
        t0 = time.perf_counter()
        roll = rollout(args, it, actor, ref, critic, dims, tokenizer, device, decode)
        mask = roll["mask"]
        ev = rl.explained_variance(roll["values"], roll["ret"], mask)
        update = ppo_epochs(args, roll, actor, critic, opts, dims)
        first, rows = update["first"], update["rows"]
        sums = torch.tensor([float(roll["scores"].sum()), float(len(roll["scores"]))], dtype=torch.float64)
        dist.all_reduce(sums, group=batch_mesh.get_group())
        row = dict(iteration=it, reward_mean=float(sums[0] / sums[1]),
                   pg_loss=[r[0] for r in rows], vf_loss=[r[1] for r in rows], kl=[r[2] for r in rows],
                   entropy=rows[0][3], first_ratio_max_dev=mean_over(first["ratio_max_dev"], dp),
                   first_approx_kl=mean_over(first["approx_kl"], dp), first_exact=first["exact"],
                   value_error=mean_over(first["value_error"], dp),
                   explained_variance=mean_over(ev, dp), seconds=time.perf_counter() - t0,
                   samples=roll["responses"])
        # Clipping and approx-KL start once the policy has moved: reported for the updated actor vs the rollout.
        after = _after_update(args, roll, actor)
        row["clip_frac"], row["approx_kl"] = mean_over(after["clip_frac"], dp), mean_over(after["approx_kl"], dp)
        log(f"iter {it:3d}  reward {row['reward_mean']:.3f}  pg {row['pg_loss'][0]:+.5f} -> {row['pg_loss'][-1]:+.5f}  "
            f"first-minibatch |ratio-1| {row['first_ratio_max_dev']:.1e} KL {row['first_approx_kl']:.1e}  "
            f"approx-KL {row['approx_kl']:.2e}  KL(ref) {row['kl'][-1]:+.2e}  clip {row['clip_frac']:.3f}  entropy {row['entropy']:.3f}  "
            f"value err {row['value_error']:.3f}  EV {row['explained_variance']:+.3f}  {row['seconds']:.1f}s  "
            f"e.g. {row['samples']!r}")
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
    dist.barrier()
    dist.destroy_process_group()


@torch.no_grad()
def _after_update(args, roll, actor) -> dict:
    """Policy metrics (clip fraction, approx-KL) of the updated actor against the rollout: how far the epochs
    moved it (this rank's tokens)."""
    lp = actor(roll["batch"])[0]
    return rl.policy_loss(lp, roll["old"], roll["adv"], roll["mask"], args.clip_low, args.clip_high)[1]


if __name__ == "__main__":
    main()
