"""A model's per-token outputs for a whole packed batch on every rank, whether the model runs whole or pipelined.

RL updates (PPO, GRPO) need what a plain forward gives on one device: each token's log-prob and entropy (or value),
all of a batch's tokens, on every rank that computes advantages and losses. The layouts hide them in different
places: under Ulysses CP a rank's forward returns its token shard; under pipeline parallelism only the last stage
has outputs, cut into microbatches. A runner puts them back:

- `runner(batch)`: no-grad outputs `[T]` (causal LM with labels: `(log-probs, entropy)`; value model: values;
  causal LM without labels: full-vocabulary logits `[T, V]`) on every rank, in the batch's token order;
- `runner.train(batch, loss_fn)`: forward + backward of `loss_fn(outputs, take, cu_seqlens)`, where `outputs` cover
  a run of whole sequences (the batch, or one pipeline microbatch), `take(x)` cuts a per-token `[T]` tensor of
  the batch to the same tokens and `cu_seqlens` bounds their sequences. The loss must add up over such runs
  (e.g. sums over a global normalizer): a pipeline adds its microbatches' gradients. Returns the outputs
  (detached) as `runner(batch)` would.

Under CP every rank of a group computes the loss over all tokens (`gather_tokens`) and back-propagates into its
own shard. Gradients are scaled only by what `loss_fn` returns: FSDP's mean over `dims.mesh("dp")` is the
caller's to undo.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from dtllama.models.blocks import ValueOutput
from dtllama.ops import Packed
from dtllama.parallel import ParallelDims
from dtllama.parallel.cp import gather_tokens
from dtllama.parallel.pp import Pipeline

LossFn = Callable[[object, Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]


def _all_tokens(x: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """All tokens' rows of a forward's per-token output: under CP it covers this rank's shard only."""
    return gather_tokens(x, dims.mesh("cp")) if dims.cp_enabled else x


def _columns(out) -> tuple[torch.Tensor, ...]:
    """The per-token tensors of a model output or a pipeline stage's output."""
    if isinstance(out, tuple):
        return out
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, ValueOutput):
        return (out.values,)
    return (out.logprobs, out.entropy) if out.logprobs is not None else (out.logits,)


def _causal(model) -> bool:
    """Whether the model is a causal LM (log-probs of labels), not a value model: the model protocol says."""
    return model.plan().output == "logprobs"


def _result(cols: tuple[torch.Tensor, ...]):
    return cols if len(cols) > 1 else cols[0]


class WholeRunner:
    """A model every rank runs whole (its parameters sharded by FSDP / TP, its tokens by CP)."""

    def __init__(self, model: torch.nn.Module, dims: ParallelDims):
        self.model, self.dims = model, dims

    def parameters(self):
        return self.model.parameters()

    def _forward(self, b: Packed) -> tuple[torch.Tensor, ...]:
        labels = dict(labels=b.labels) if _causal(self.model) else {}
        out = self.model(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen, **labels)
        return tuple(_all_tokens(c, self.dims) for c in _columns(out))

    @torch.no_grad()
    def __call__(self, b: Packed):
        return _result(self._forward(b))

    def train(self, b: Packed, loss_fn: LossFn):
        cols = self._forward(b)
        loss_fn(_result(cols), lambda x: x, b.cu_seqlens).backward()
        return _result(tuple(c.detach() for c in cols))


class PipelineRunner:
    """A model cut into pipeline stages (`pipeline_llm`): the last stage's outputs, microbatches merged back into
    the batch's order, shared with every pipeline rank (a sum over `pp` of zeros and the last stage's values)."""

    def __init__(self, pipe: Pipeline, dims: ParallelDims):
        self.pipe, self.dims = pipe, dims

    @property
    def model(self) -> torch.nn.Module:
        """This rank's part of the model (its stages' layers)."""
        return self.pipe.model

    def parameters(self):
        return self.pipe.model.parameters()

    def _share(self, mbs, outs: list | None, b: Packed) -> tuple[torch.Tensor, ...]:
        """Merge the last stage's per-microbatch outputs and send them to every pipeline rank."""
        T = b.input_ids.numel()
        if _causal(self.pipe.model) and b.labels is None:
            shapes = [(T, self.pipe.model.config.vocab_size)]
        else:
            shapes = [(T,)] * (2 if _causal(self.pipe.model) else 1)
        if outs is None:
            cols = [torch.zeros(s, device=b.input_ids.device) for s in shapes]
        else:
            per_mb = [tuple(_all_tokens(c, self.dims) for c in (o if isinstance(o, tuple) else (o,))) for o in outs]
            cols = [mbs.merge([o[k] for o in per_mb]).float() for k in range(len(shapes))]
        for c in cols:
            dist.all_reduce(c, group=self.dims.mesh("pp").get_group())
        return tuple(cols)

    @torch.no_grad()
    def __call__(self, b: Packed):
        mbs = self.pipe.split(b)
        return _result(self._share(mbs, self.pipe.forward(mbs), b))

    def train(self, b: Packed, loss_fn: LossFn):
        mbs = self.pipe.split(b)

        def microbatch_loss(out, i: int) -> torch.Tensor:
            cols = tuple(_all_tokens(c, self.dims) for c in (out if isinstance(out, tuple) else (out,)))
            return loss_fn(_result(cols), lambda x: mbs.take(x, i), mbs.packed[i].cu_seqlens)

        result = self.pipe.step(mbs, microbatch_loss)
        return _result(self._share(mbs, result[0] if result else None, b))


__all__ = ["PipelineRunner", "WholeRunner"]
