"""Tensor + sequence parallelism with `parallelize_module`, over the packed token dim.

Between blocks the residual stream is sharded on tokens (`Shard(0)` of `[T, hidden]`, sequence
parallel): norms run on T/tp tokens, and each attention/MLP all-gathers its input, runs column-wise
q/k/v/gate/up and row-wise o/down projections on its own heads / hidden slice, and reduce-scatters
the output back to tokens. Embedding and output head are vocab-parallel (`Shard(0)` of the vocab);
the head's log-probs, entropy and loss are computed without gathering full-vocab logits
(`dtllama.ops.linear_logprobs_entropy` sees the DTensor weight). When `tp` exceeds the KV heads,
each rank computes all KV heads and keeps the one its query heads use (`ReplicatedKV`).
Which module takes which role, every family declares (`layer.plan().tp`, `model.plan().tp`: the model protocol);
an MoE layer's router and routed experts work on this rank's own tokens (`RoutedRouter`; the experts are
sharded by `parallel.ep`, never by TP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from dtllama.models import protocol as P

from .dims import check_tp


class ReplicatedKV(ParallelStyle):
    """k/v projection with fewer KV heads than TP ranks: weight replicated, output one KV head per rank.

    The full `[T, kv*d]` output is expanded to one head per rank and redistributed `Replicate -> Shard`,
    a local slice whose backward all-gathers the per-rank gradients, so the replicated weight
    receives the same, complete gradient on every rank.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        d = self.head_dim

        def input_fn(mod, inputs, mesh):  # all tokens, a plain tensor (the attention's PrepareModuleInput)
            return DTensor.from_local(inputs[0], mesh, [Replicate()], run_check=False)

        def output_fn(mod, out, mesh):
            T, tp = out.shape[0], mesh.size()
            kv = out.shape[1] // d
            heads = out.view(T, kv, 1, d).expand(T, kv, tp // kv, d).reshape(T, tp, d)
            return heads.redistribute(mesh, [Shard(1)]).to_local().reshape(T, d)

        return distribute_module(module, mesh, input_fn=input_fn, output_fn=output_fn)


class TokenShardedEmbedding(RowwiseParallel):
    """Vocab-parallel embedding whose partial output is reduce-scattered to tokens (`Shard(0)`) *synchronously*.

    `RowwiseParallel` reduce-scatters with `async_op=True`, so `to_local()` hands the first decoder
    block an `AsyncCollectiveTensor`. When that block is compiled, torch 2.13's AOTAutograd resolves the
    input with `trigger_wait()`, which drops its autograd edge: the block is traced as not needing
    its input's gradient, and the embedding's backward gets a zero plain tensor that DTensor's
    redistribute rejects ("'Tensor' object has no attribute '_local_tensor'"; pytorch/pytorch#191113).
    The block's first op (the norm) needs the tokens at once, so waiting here costs no overlap.
    The output is a copy, not `to_local()`'s view: a compiled block guards on a view input's base, so
    layer 0 would otherwise compile a graph of its own once T turns dynamic.
    """

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        return outputs.redistribute(placements=output_layouts).to_local().clone()


class ReplicatedHead(ParallelStyle):
    """A small head (the value `score`) replicated on every TP rank, fed all tokens."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def input_fn(mod, inputs, mesh):
            return inputs[0].redistribute(mesh, [Replicate()])

        def output_fn(mod, out, mesh):
            return out.to_local()

        return distribute_module(module, mesh, input_fn=input_fn, output_fn=output_fn)


class RoutedRouter(ParallelStyle):
    """A MoE router (`nn.Linear` to expert logits) on this rank's token shard, weight replicated: all tokens'
    logits are computed on every TP rank and each keeps its own tokens'.

    The routed experts take this rank's tokens only (`parallel.ep`), so the logits' gradient differs per rank;
    the `Replicate -> Shard(0)` of the logits all-gathers it in backward, so the replicated weight receives the
    same, complete gradient on every rank (as `ReplicatedKV`). The router is small: E outputs per token."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def input_fn(mod, inputs, mesh):
            return DTensor.from_local(inputs[0], mesh, [Shard(0)], run_check=False).redistribute(mesh, [Replicate()])

        def output_fn(mod, out, mesh):
            return out.redistribute(mesh, [Shard(0)]).to_local()

        return distribute_module(module, mesh, input_fn=input_fn, output_fn=output_fn)


class _SumOverTokenShards(torch.autograd.Function):
    """All-reduce (sum) in forward, identity in backward. Every TP rank computes the same load-balance loss from
    the summed statistics, and sends its gradient only into its own tokens' router logits; `RoutedRouter`'s
    backward gathers those, so the replicated router weight gets the one-device gradient (an all-reduce in
    backward would count it tp times)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_over_token_shards(x: torch.Tensor, group) -> torch.Tensor:
    """`x` summed over the ranks of `group`, which hold other token shards of the same sequences (TP's sequence
    parallel, Ulysses CP), for statistics every rank then computes alike; see `_SumOverTokenShards`."""
    return _SumOverTokenShards.apply(x, group)


def sum_token_statistics(model: nn.Module, plan: P.ModelPlan, group) -> None:
    """Sum the output of each of the model's token-statistic hook points (`plan.token_sums`) over `group`, the ranks
    holding other token shards of the same sequences (TP's sequence parallel, Ulysses CP; the hooks compose)."""
    for name in plan.token_sums:
        model.get_submodule(name).register_forward_hook(lambda mod, args, out: sum_over_token_shards(out, group))


def _to_all_tokens(n_args: int) -> PrepareModuleInput:
    rest = (None,) * (n_args - 1)  # the attention's positions and spans pass through untouched
    return PrepareModuleInput(
        input_layouts=(Shard(0), *rest), desired_input_layouts=(Replicate(), *rest), use_local_output=True
    )


_STYLES = {
    P.Colwise: ColwiseParallel,
    P.Rowwise: lambda: RowwiseParallel(output_layouts=Shard(0)),
    P.TokenShardedNorm: lambda: SequenceParallel(sequence_dim=0),
    # Rows of this rank's heads: a "token shard" as far as the replicated weight's gradient sum is concerned.
    P.HeadNorm: lambda: SequenceParallel(sequence_dim=0, use_local_output=True),
    P.OwnTokens: lambda: PrepareModuleInput(input_layouts=(Shard(0),), desired_input_layouts=(Shard(0),),
                                            use_local_output=True),
    P.Router: RoutedRouter,
    P.VocabEmbedding: lambda: TokenShardedEmbedding(input_layouts=Replicate(), output_layouts=Shard(0)),
    P.VocabHead: ColwiseParallel,  # only the weight is used (by the head op): vocab rows sharded
    P.ReplicatedHead: ReplicatedHead,
    # TP without sequence parallel (a transformers model's own plan): the residual stream stays replicated.
    P.RowwiseReplicated: RowwiseParallel,
    P.ColwiseGathered: lambda: ColwiseParallel(output_layouts=Replicate()),
    P.RowwiseOfFull: lambda: RowwiseParallel(input_layouts=Replicate()),
    P.VocabEmbeddingReplicated: lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
}


def torch_style(style: P.Style, config, tp: int) -> ParallelStyle:
    """The torch `ParallelStyle` of a protocol style (`dtllama.models.protocol`) for this config at degree `tp`."""
    if isinstance(style, P.KVProjection):
        return ColwiseParallel() if config.num_key_value_heads % tp == 0 else ReplicatedKV(config.head_dim)
    if isinstance(style, P.AllTokens):
        return _to_all_tokens(style.n_args)
    if type(style) not in _STYLES:
        raise TypeError(f"no tensor-parallel style for {style!r}; dtllama.parallel.tp knows "
                        f"{[c.__name__ for c in _STYLES]}, KVProjection and AllTokens")
    return _STYLES[type(style)]()


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard `model` (or a pipeline stage of it) in place over the 1-D `tp_mesh` (tensor + sequence parallel), as
    its layers' and its own plans say (the model protocol); returns it."""
    config, tp = model.config, tp_mesh.size()
    check_tp(config, tp)
    for layer in model.model.layers.values():
        styles = model.layer_plan(layer).tp
        parallelize_module(layer, tp_mesh, {k: torch_style(v, config, tp) for k, v in styles.items()})
    plan = model.plan()
    sum_token_statistics(model, plan, tp_mesh.get_group())
    parallelize_module(model, tp_mesh, {k: torch_style(v, config, tp) for k, v in plan.tp.items()})
    return model


__all__ = ["ReplicatedHead", "ReplicatedKV", "RoutedRouter", "TokenShardedEmbedding", "apply_tp", "sum_over_token_shards"]
