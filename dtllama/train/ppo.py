"""PPO / GRPO on packed prompt + response batches: the actor, reference and critic, a rollout, and the update.

A rollout: every rank of the batch mesh (`dp_replicate x dp_shard`) samples `group_size` responses per prompt of
its share (at most `max_new_tokens`, stop at eos) from the actor's logits, packs prompt + response per sequence,
records the actor's log-probs ("old"), the frozen reference's log-probs and the critic's values, and computes
advantages (GAE, or GRPO's group normalization). The update runs `ppo_epochs` epochs over the batch (one minibatch:
the rank's whole batch): clipped policy loss + `vf_coef` x clipped value loss + `kl_coef` x KL(actor || ref) (k1/k3)
- `entropy_coef` x entropy, on response tokens only, normalized by the global response-token (or sequence) count
so that every token weighs the same on any mesh.

Exactness: the first epoch's forward is the rollout's forward on the same weights and the same packed batch, so its
log-probs must equal the recorded ones bitwise (ratio exactly 1, approx-KL exactly 0); the update asserts it on
every rank. Under TP the sampling logits are gathered to the full vocabulary on every rank, so the ranks of a TP
group, with identically seeded generators, sample identical tokens (checked each rollout, as for CP and pp). Under
Ulysses CP the runners gather the token shards, so every CP rank of a group computes the same advantages and
losses over whole sequences and sends back only its own tokens' gradients. Under pp each model is cut into stages;
the last stage's outputs are shared with every pipeline rank and an update is one schedule step whose
per-microbatch loss is the batch loss's share (`dtllama.train.runner`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

import dtllama
from dtllama.ops import Packed, cu_seqlens_from_lengths, pad_to_multiple, shift_labels
from dtllama.parallel import ParallelDims, after_optimizer_step, balance_experts, clip_grad_norm_
from dtllama.parallel.pp import PipelineOptions
from dtllama.train import rl
from dtllama.train.build import build_model
from dtllama.train.config import Layout, opt
from dtllama.train.runner import PipelineRunner, WholeRunner


@dataclass
class PPO:
    """PPO / GRPO options: sampling, advantages, clipping, loss weights, the critic's learning rate."""

    group_size: int = opt(2, "responses sampled per prompt")
    max_new_tokens: int = opt(6, "longest response (sampling stops at eos)")
    ppo_epochs: int = opt(4, "epochs over each rollout batch")
    advantage: str = opt("gae", "GAE from the critic's values, or GRPO's normalization within a prompt's group",
                         choices=("gae", "grpo"))
    gamma: float = opt(1.0, "GAE discount")
    lam: float = opt(0.95, "GAE lambda")
    clip_low: float = opt(0.2, "policy ratio clip below 1")
    clip_high: float = opt(0.28, "policy ratio clip above 1")
    value_clip: float = opt(0.5, "value clip around the rollout's values")
    agg: str = opt("token-mean", "loss aggregation over tokens and sequences", choices=list(rl.AGG_MODES))
    kl_kind: str = opt("k3", "KL(actor || ref) estimator", choices=list(rl.KL_KINDS))
    kl_coef: float = opt(0.01)
    vf_coef: float = opt(0.5)
    entropy_coef: float = opt(0.0)
    critic_lr: float = opt(1e-3, "the critic's learning rate (--lr is the actor's)")
    rollout_logprobs: str = opt("trainer", "the rollout engine's log-probs: 'trainer' (the actor's own at sampling) "
                                           "or 'noise:SIGMA' (those plus Gaussian noise: an engine simulated)")
    rollout_correction: str = opt("none", "weight the policy loss for the engine / trainer mismatch: truncated "
                                          "per-token ratios (tis) or sequences masked outside the bounds (mis)",
                                  choices=list(rl.CORRECTIONS))
    tis_cap: float = opt(2.0, "tis: the cap of each token's ratio")
    mis_low: float = opt(0.5, "mis: the lowest sequence ratio kept")
    mis_high: float = opt(2.0, "mis: the highest sequence ratio kept")

    def __post_init__(self):
        if self.group_size < 1 or self.max_new_tokens < 1 or self.ppo_epochs < 1:
            raise ValueError(f"group_size={self.group_size}, max_new_tokens={self.max_new_tokens} and ppo_epochs="
                             f"{self.ppo_epochs} must each be >= 1")
        self.rollout_noise()  # a bad spec fails at parsing
        if self.advantage == "grpo" and self.group_size < 2:
            raise ValueError("advantage='grpo' needs group_size >= 2 (a group of one has no baseline): raise "
                             "--group-size or use --advantage gae")

    def rollout_noise(self) -> float:
        """The std of the simulated engine's noise (0 for the trainer's own log-probs)."""
        spec = self.rollout_logprobs
        if spec == "trainer":
            return 0.0
        kind, _, sigma = spec.partition(":")
        try:
            value = float(sigma)
        except ValueError:
            value = -1.0
        if kind != "noise" or not value >= 0:
            raise ValueError(f"--rollout-logprobs {spec!r}: expected 'trainer' or 'noise:SIGMA' with SIGMA >= 0 "
                             "(e.g. noise:0.05)")
        return value


Runner = WholeRunner | PipelineRunner


@dataclass
class ActorCritic:
    """The three models of PPO on this rank (as runners: all tokens' outputs on every rank) and the optimizers of
    the two that learn."""

    actor: Runner
    ref: Runner
    critic: Runner
    actor_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer
    device: torch.device


@dataclass
class Rollout:
    """This rank's PPO batch: per-token tensors `[T]` over the packed `batch` (padding tail included, zero there)."""

    batch: Packed
    mask: torch.Tensor  # 1 where a label is a response token
    old: torch.Tensor  # the actor's log-probs at sampling
    ref: torch.Tensor  # the reference's log-probs
    values: torch.Tensor  # the critic's values
    adv: torch.Tensor
    ret: torch.Tensor  # returns: the critic's targets
    scores: torch.Tensor  # one reward per sequence
    responses: list[list[int]]  # the sampled token ids per sequence
    rollout_lp: torch.Tensor  # the engine's log-probs of the sampled tokens (`PPO.rollout_logprobs`)
    weights: torch.Tensor | None  # the rollout correction's per-token weights (None: no correction)
    correction: dict  # the engine / trainer mismatch metrics (`rl.rollout_correction`)


@dataclass
class Update:
    """The global losses of each epoch and the first epoch's policy / value metrics."""

    pg_loss: list[float]
    vf_loss: list[float]
    kl: list[float]
    entropy: list[float]
    first: dict


def actor_critic(config, dims: ParallelDims, layout: Layout, device: torch.device, ppo: PPO, lr: float, *,
                 pipeline: PipelineOptions | None = None, source: str | None = None, seed: int = 0) -> ActorCritic:
    """Actor and reference (the causal LM of `config`'s family) and critic (its value model), from one source."""
    kw = dict(pipeline=pipeline, source=source, seed=seed)
    causal, value = dtllama.model_class(config), dtllama.model_class(config, value=True)
    actor = build_model(causal, config, dims, layout, device, **kw).runner
    ref = build_model(causal, config, dims, layout, device, **kw).runner
    critic = build_model(value, config, dims, layout, device, **kw).runner
    return ActorCritic(actor, ref, critic, torch.optim.AdamW(actor.parameters(), lr=lr, weight_decay=0.0),
                       torch.optim.AdamW(critic.parameters(), lr=ppo.critic_lr, weight_decay=0.0), device)


def rollout_microbatch_tokens(seqs: int, longest: int, microbatches: int, token_multiple: int) -> int:
    """Pipeline microbatch tokens that fit a rank's `seqs` sequences of at most `longest` tokens: first-fit into
    `microbatches` bins fits once each bin can take its even share plus one more sequence, and the padding tail
    (`pad_to_multiple`) one token under tp*cp."""
    return (-(-seqs // microbatches) + 1) * longest + token_multiple


def pack_sequences(seqs: list[list[int]], dims: ParallelDims, device, labels: bool) -> Packed:
    """Token sequences packed (padded to a multiple of tp*cp); without labels the causal LM returns logits."""
    ids = torch.tensor([t for s in seqs for t in s], device=device)
    cu = cu_seqlens_from_lengths([len(s) for s in seqs], device=device)
    b = pad_to_multiple(ids, cu, dims.token_multiple, shift_labels(ids, cu) if labels else None)
    return b if labels else dataclasses.replace(b, labels=None)


@torch.no_grad()
def sample(actor: Runner, prompts: list[list[int]], max_new: int, eos: int, gen: torch.Generator, dims: ParallelDims,
           device) -> list[list[int]]:
    """Sample responses token by token from the full-vocab logits of each sequence's last token.

    Every rank runs exactly `max_new` forwards (finished sequences ride along), so FSDP's all-gathers line up on
    every rank whatever its sequences do. The logits are the same on every rank of a TP / CP / pipeline group
    (gathered or shared), so with one seed they sample alike."""
    responses = [[] for _ in prompts]
    for _ in range(max_new):
        seqs = [p + r for p, r in zip(prompts, responses)]
        b = pack_sequences(seqs, dims, device, labels=False)
        logits = actor(b)
        last = b.cu_seqlens[1:len(seqs) + 1].long() - 1
        tokens = torch.multinomial(torch.softmax(logits[last].float(), -1).cpu(), 1, generator=gen).squeeze(1)
        for r, t in zip(responses, tokens.tolist()):
            if not r or r[-1] != eos:
                r.append(t)
    return responses


def _check_same_samples(responses: list[list[int]], dims: ParallelDims) -> None:
    """The ranks of a TP, CP or pipeline group must have sampled the same tokens."""
    for name in ("tp", "cp", "pp"):
        if getattr(dims, f"{name}_enabled"):
            got = [None] * getattr(dims, name)
            dist.all_gather_object(got, responses, group=dims.mesh(name).get_group())
            assert all(g == responses for g in got), f"{name.upper()} ranks sampled different tokens"


def rollout(models: ActorCritic, prompts: list[list[int]], reward: Callable[[int, list[int]], float], ppo: PPO,
            gen: torch.Generator, eos: int, dims: ParallelDims) -> Rollout:
    """Sample `ppo.group_size` responses to each of this rank's `prompts`, score response j of prompt i with
    `reward(i, response ids)`, and record log-probs, values and advantages."""
    expanded = [p for p in prompts for _ in range(ppo.group_size)]
    responses = sample(models.actor, expanded, ppo.max_new_tokens, eos, gen, dims, models.device)
    _check_same_samples(responses, dims)
    seqs = [p + r for p, r in zip(expanded, responses)]
    b = pack_sequences(seqs, dims, models.device, labels=True)
    # labels[t] is token t+1: the response tokens are read at positions len(prompt)-1 .. len(seq)-2.
    mask = torch.zeros_like(b.input_ids, dtype=torch.float32)
    start = 0
    for p, s in zip(expanded, seqs):
        mask[start + len(p) - 1: start + len(s) - 1] = 1
        start += len(s)
    scores = torch.tensor([reward(i // ppo.group_size, r) for i, r in enumerate(responses)])
    old, ref_lp, values = models.actor(b)[0], models.ref(b)[0], models.critic(b)
    adv, ret = _advantages(b, mask, scores, values, len(prompts), ppo)
    sigma = ppo.rollout_noise()
    # The ranks of a TP / CP / pipeline group share `gen` (they sampled the same tokens): the same noise.
    rollout_lp = old + sigma * torch.randn(old.shape, generator=gen).to(old.device) * mask if sigma else old
    weights, correction = rl.rollout_correction(old, rollout_lp, mask, b.cu_seqlens, ppo.rollout_correction,
                                                ppo.tis_cap, ppo.mis_low, ppo.mis_high)
    weights = None if ppo.rollout_correction == "none" else weights
    return Rollout(b, mask, old, ref_lp, values, adv, ret, scores, responses, rollout_lp, weights, correction)


def _advantages(b: Packed, mask, scores, values, n_prompts: int, ppo: PPO):
    """(advantages, returns) per token: GAE on the critic's values with the reward at the last response token, or
    GRPO's group-normalized scores (and the score as the return the critic learns)."""
    cu = b.cu_seqlens[: len(scores) + 1]  # the real sequences (the padding tail has no response tokens)
    real = int(cu[-1])
    if ppo.advantage == "gae":
        token_rewards = torch.zeros_like(mask)
        token_rewards[cu[1:].long() - 2] = scores  # at the last response token (read at its sequence's end - 2)
        adv, ret = rl.gae_advantages(token_rewards[:real], values[:real], mask[:real], cu, ppo.gamma, ppo.lam)
        return _pad(adv, mask), _pad(ret, mask)
    group = torch.arange(n_prompts).repeat_interleave(ppo.group_size)
    adv = _pad(rl.broadcast_to_tokens(rl.grpo_advantages(scores, group), mask[:real], cu), mask)
    # GRPO needs no critic; it still learns the Monte-Carlo return (the score, gamma = 1) for the metrics.
    return adv, _pad(rl.broadcast_to_tokens(scores, mask[:real], cu), mask)


def _pad(x, like):
    """A tensor of the real tokens, zero-extended to the padded length."""
    return torch.cat([x, x.new_zeros(like.shape[0] - x.shape[0])])


def _normalizer(roll: Rollout, ppo: PPO, dims: ParallelDims) -> float:
    """The global count of response tokens (or sequences), all-reduced once over the batch mesh (the CP and
    pipeline ranks of a group hold the same, whole sequences)."""
    counts = torch.tensor([float(roll.mask.sum()), float(len(roll.scores))], dtype=torch.float64)
    dist.all_reduce(counts, group=dims.mesh("batch").get_group())
    return float(counts[0] if ppo.agg == "token-mean" else counts[1])


def _loss_fns(roll: Rollout, ppo: PPO, norm: float, scale: float):
    """The actor's and the critic's `loss_fn(outputs, take, cu_seqlens)` for `runner.train`: the loss of the
    tokens `take` cuts from the rollout's per-token tensors, times `scale` (dp: FSDP's gradient mean undone)."""
    agg = ppo.agg

    def actor_loss(out, take, cu):
        (lp, ent), m = out, take(roll.mask)
        if not bool(m.any()):  # a pipeline microbatch without responses (first-fit filled the others)
            return lp.sum() * 0.0
        w = None if roll.weights is None else take(roll.weights)
        pg = rl.policy_loss(lp, take(roll.old), take(roll.adv), m, ppo.clip_low, ppo.clip_high, agg, cu, norm, w)[0]
        kl = rl.aggregate(rl.kl_penalty(lp, take(roll.ref), ppo.kl_kind), m, agg, cu, norm)
        return (pg + ppo.kl_coef * kl - ppo.entropy_coef * rl.entropy_bonus(ent, m, agg, cu, norm)) * scale

    def critic_loss(values, take, cu):
        if not bool(take(roll.mask).any()):
            return values.sum() * 0.0
        m = take(roll.mask)
        vf = rl.value_loss(values, take(roll.values), take(roll.ret), m, ppo.value_clip, agg, cu, norm)[0]
        return ppo.vf_coef * vf * scale

    return actor_loss, critic_loss


def ppo_update(roll: Rollout, models: ActorCritic, ppo: PPO, dims: ParallelDims) -> Update:
    """`ppo.ppo_epochs` epochs over the rank's batch: actor and critic each take one forward + backward per epoch
    (under pp, one schedule step over the batch's microbatches); the logged terms are recomputed from the returned
    outputs over the whole batch and summed over the batch mesh."""
    norm = _normalizer(roll, ppo, dims)
    # FSDP averages gradients over dp (cp included): undo it, each term is already global (and each CP rank's
    # backward covers its own tokens only).
    actor_loss, critic_loss = _loss_fns(roll, ppo, norm, dims.mesh("dp").size())
    rows, first = [], {}
    for epoch in range(ppo.ppo_epochs):
        logprobs, entropy = models.actor.train(roll.batch, actor_loss)
        values = models.critic.train(roll.batch, critic_loss)
        row, pm, vm = _epoch_terms(roll, ppo, norm, logprobs, entropy, values)
        if epoch == 0:
            first = _check_first_epoch(roll, logprobs, pm) | vm
        for run, opt_ in ((models.actor, models.actor_opt), (models.critic, models.critic_opt)):
            clip_grad_norm_(run.parameters(), 1.0, pp_mesh=dims.mesh("pp"))
            opt_.step()
            opt_.zero_grad()
            after_optimizer_step(run.model)
            balance_experts(run.model, dims)
        dist.all_reduce(row, group=dims.mesh("batch").get_group())  # each term is a partial sum of the global mean
        rows.append(row.tolist())
    pg, vf, kl, ent = (list(col) for col in zip(*rows))
    return Update(pg, vf, kl, ent, first)


def _epoch_terms(roll: Rollout, ppo: PPO, norm: float, logprobs, entropy, values):
    """This rank's share of an epoch's (policy, value, KL, entropy) terms, and the policy and value metrics."""
    cu, mask, agg = roll.batch.cu_seqlens, roll.mask, ppo.agg
    pg, pm = rl.policy_loss(logprobs, roll.old, roll.adv, mask, ppo.clip_low, ppo.clip_high, agg, cu, norm,
                            roll.weights)
    vf, vm = rl.value_loss(values, roll.values, roll.ret, mask, ppo.value_clip, agg, cu, norm)
    kl = rl.aggregate(rl.kl_penalty(logprobs, roll.ref, ppo.kl_kind), mask, agg, cu, norm)
    ent = rl.entropy_bonus(entropy, mask, agg, cu, norm)
    return torch.stack([pg, vf, kl, ent]).double(), pm, vm


def _check_first_epoch(roll: Rollout, logprobs: torch.Tensor, m: dict) -> dict:
    """Same weights, same batch, same forward: the first epoch's log-probs are the rollout's, bitwise."""
    exact = torch.equal(logprobs, roll.old)
    if not exact or m["ratio_max_dev"] != 0.0 or m["approx_kl"] != 0.0:
        raise AssertionError(f"rank {dist.get_rank()}: first-minibatch log-probs differ from the rollout's: "
                             f"max |ratio - 1| = {m['ratio_max_dev']}, approx-KL = {m['approx_kl']}")
    return dict(m, exact=exact)


@torch.no_grad()
def after_update(roll: Rollout, actor: Runner, ppo: PPO) -> dict:
    """Policy metrics (clip fraction, approx-KL) of the updated actor against the rollout: how far the epochs moved
    it (this rank's tokens)."""
    lp = actor(roll.batch)[0]
    return rl.policy_loss(lp, roll.old, roll.adv, roll.mask, ppo.clip_low, ppo.clip_high)[1]


__all__ = ["PPO", "ActorCritic", "Rollout", "Update", "actor_critic", "after_update", "pack_sequences",
           "ppo_update", "rollout", "rollout_microbatch_tokens", "sample"]
