"""The pieces of a language-model training loop: packing, each rank's micro-batches, one step, checkpoints.

A step's loss is the mean over all real loss tokens of all ranks, so it does not depend on the layout: each rank
sums its tokens' losses over the global token count (FSDP's gradient mean over dp undone by a factor dp), and
micro-batches, pipeline microbatches and ranks only change the order of the sums.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dtllama.ops import CrossEntropy, Packed, cu_seqlens_from_lengths, pad_to_multiple
from dtllama.parallel import ParallelDims, after_optimizer_step, balance_experts, clip_grad_norm_
from dtllama.parallel.pp import Pipeline
from dtllama.train.checkpoint import Checkpointer, TrainState, check_compatible
from dtllama.train.config import Checkpointing, Optim, Training
from dtllama.train.data import Example, balance, microbatches
from dtllama.train.optim import adamw, lr_multiplier, step_if_finite


def pack(examples: list[Example], multiple: int, device) -> Packed:
    """Examples as one packed batch with next-token labels, padded to a multiple of tp*cp (SP and Ulysses split T)."""
    ids = torch.tensor([t for ex in examples for t in ex.ids], device=device)
    labels = torch.tensor([t for ex in examples for t in ex.labels()], device=device)
    cu = cu_seqlens_from_lengths([len(ex.ids) for ex in examples], device=device)
    return pad_to_multiple(ids, cu, multiple, labels)


def my_microbatches(batch: list[Example], dims: ParallelDims, max_tokens: int, filler: Example) -> list[list[Example]]:
    """This rank's micro-batches of a global batch: sequences balanced over the batch mesh (`dp_replicate x
    dp_shard`; the CP ranks of a group share theirs), packed by the token budget, and topped up with `filler`
    micro-batches to the count of the busiest rank, so that FSDP's collectives stay in step."""
    mesh = dims.mesh("batch")
    shares = [microbatches(share, max_tokens) for share in balance(batch, mesh.size())]
    mine = shares[mesh.get_local_rank()]
    return mine + [[filler]] * (max(map(len, shares)) - len(mine))


class RouterTotals:
    """A MoE model's router statistics over a step's micro-batches: tokens per expert (summed over MoE layers, then
    over all ranks: data-parallel ranks hold other sequences, TP ranks other token shards) and the mean
    load-balance loss, which joins the training loss (the LM `loss` metric stays without it). Empty for dense
    models (their outputs carry no `router_stats`).

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


def train_step(model, opt, sched, batch: list[Example], dims: ParallelDims, filler: Example, training: Training,
               optim: Optim, pipe: Pipeline | None = None) -> dict:
    """Forward and backward of this rank's micro-batches (or one pipeline schedule step), clip, step; returns the
    loss over all ranks' loss tokens, the gradient norm, whether the step was skipped, and router metrics."""
    dp_mesh = dims.mesh("dp")
    device = next(model.parameters()).device
    # Sum over this rank's tokens / the global count of loss tokens, times dp: FSDP averages gradients over
    # the dp ranks (cp included: under CP the log-probs are this rank's token shard), so every token
    # weighs the same whatever rank holds it, and the result does not depend on the layout.
    scale = dp_mesh.size() / max(sum(ex.loss_tokens for ex in batch), 1)
    router = RouterTotals(dims.cp)
    if pipe is None:
        reported = torch.zeros((), device=device)
        mbs = my_microbatches(batch, dims, training.max_tokens_per_microbatch or training.batch_tokens, filler)
        for i, mb in enumerate(mbs):
            if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce-scatter once, after the last one
                model.set_requires_gradient_sync(i == len(mbs) - 1)
            p = pack(mb, dims.token_multiple, device)
            # The fused loss head: the summed cross-entropy of this rank's tokens times `scale`, its gradients made
            # in forward (three head matmuls, no logits kept for backward).
            out = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=p.labels,
                        loss=CrossEntropy(normalizer=1.0 / scale))
            loss = out.loss
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
    stepped = step_if_finite(opt, sched, float(reported), grad_norm, optim.on_nonfinite)
    if stepped:
        after_optimizer_step(model)  # float8 all-gathers: the next step's weight scales, in one all-reduce
    balance_experts(model, dims, update=stepped)
    return dict(loss=float(reported), grad_norm=grad_norm, skipped=not stepped, **router.metrics())


def optimizer(model: torch.nn.Module, optim: Optim, steps: int):
    """AdamW (decay on matrices only) and its warm-up + decay schedule over `steps` optimizer steps."""
    opt = adamw(model, optim.lr, optim.weight_decay)
    warmup = max(optim.warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: lr_multiplier(i, warmup, steps, optim.lr_schedule, optim.min_lr_ratio))
    return opt, sched


def open_checkpointer(cfg: Checkpointing, state: TrainState, log) -> Checkpointer | None:
    """The checkpointer (or None), after restoring the newest checkpoint if `resume`."""
    ckpt = (Checkpointer(cfg.checkpoint_dir, cfg.keep_last, cfg.async_checkpoint, cfg.on_save_error)
            if cfg.checkpoint_dir else None)
    if ckpt is not None and not cfg.resume and ckpt.steps():
        raise ValueError(f"--checkpoint-dir {cfg.checkpoint_dir!r} already holds checkpoints {ckpt.steps()}; "
                         "pass --resume to continue from them, or choose an empty folder")
    if cfg.resume:
        if ckpt is None:
            raise ValueError("--resume needs --checkpoint-dir")
        found = ckpt.load_latest(state, check=lambda path: [check_compatible(path, m, key)
                                                            for key, m in state.models().items()])
        for path, problems in ckpt.skipped:
            log(f"checkpoint {path} is broken, not loaded: {'; '.join(problems[:3])}")
        log(f"resumed from {ckpt.path(found)}" if found is not None
            else "no checkpoint to resume from: starting at step 1")
    return ckpt


def save_due(cfg: Checkpointing, step: int, last: int) -> bool:
    """Whether to checkpoint after `step`: every `checkpoint_every` steps and at the `last`."""
    every = cfg.checkpoint_every
    return bool(cfg.checkpoint_dir) and (step == last or bool(every and step % every == 0))


__all__ = ["RouterTotals", "my_microbatches", "open_checkpointer", "optimizer", "pack", "save_due", "train_step"]
