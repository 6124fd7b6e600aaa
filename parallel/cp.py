"""Ulysses context parallelism (DeepSpeed-Ulysses, arXiv 2309.14509) on packed sequences.

Every rank of a CP group receives the same global packed batch (`input_ids[T]`, positions, the global
`cu_seqlens`, labels; T a multiple of tp*cp, see `pad_to_multiple`) and owns a contiguous token shard
`[r*T/cp, (r+1)*T/cp)`. Hooks at the boundaries the model exposes do the rest; the model stays
mesh-unaware:
- the decoder (`model.model`) gets this rank's slice of `input_ids` and `position_ids` (RoPE reads the
  sliced global positions) and the global `cu_seqlens`/`max_seqlen`, which the layers hand to the
  attention core untouched;
- each attention core runs between two all-to-alls (`UlyssesAttention`): `[T/cp, H, D]` tokens are
  traded for heads, `[T, H/cp, D]`, attention runs over all T tokens of whole sequences with any
  backend, and the output is traded back. With fewer KV heads than cp, KV heads are repeated first
  so that each rank receives the KV head its query heads read;
- the causal-LM head (`logprobs_head`) gets this rank's slice of the labels. Log-probs, entropy,
  logits and values come back as `[T/cp]`: the outputs of this rank's own tokens.
Padded `[B, S]` input is refused (`check_cp_batch`): its re-padding needs all T outputs on one rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .tp import sum_token_statistics


def all_to_all(x: torch.Tensor, cp_mesh: DeviceMesh) -> torch.Tensor:
    """Autograd all-to-all over dim 0 of `x` (cp equal chunks; chunk i goes to rank i, and the output's
    chunk i comes from rank i); its backward is the reverse all-to-all. A functional collective, so a
    compiled block traces it as a graph op."""
    out = funcol.all_to_all_single_autograd(x.contiguous(), None, None, cp_mesh)
    return funcol.wait_tensor(out)


def tokens_to_heads(x: torch.Tensor, cp_mesh: DeviceMesh) -> torch.Tensor:
    """`[T/cp, H, D]` on each rank -> `[T, H/cp, D]`: all tokens, this rank's slice of the heads."""
    cp = cp_mesh.size()
    t, h, d = x.shape
    chunks = x.view(t, cp, h // cp, d).transpose(0, 1)  # chunk j: the heads rank j will own
    return all_to_all(chunks, cp_mesh).reshape(cp * t, h // cp, d)  # chunk i: the tokens of rank i


def heads_to_tokens(x: torch.Tensor, cp_mesh: DeviceMesh) -> torch.Tensor:
    """`[T, H/cp, D]` -> `[T/cp, H, D]`: the inverse of `tokens_to_heads`."""
    cp = cp_mesh.size()
    T, h, d = x.shape
    out = all_to_all(x.view(cp, T // cp, h, d), cp_mesh)  # chunk i: rank i's heads of this rank's tokens
    return out.transpose(0, 1).reshape(T // cp, cp * h, d)


class UlyssesAttention(nn.Module):
    """Wraps an attention core `(q, k, v, cu_seqlens, max_seqlen, **options)` of `[T/cp, heads, D]` inputs:
    all-to-all to `[T, heads/cp, D]`, the core over all T tokens with the global `cu_seqlens`, all-to-all back.

    Query heads of rank j are `[j*Hq/cp, (j+1)*Hq/cp)`. With `Hkv % cp == 0` rank j gets KV heads
    `[j*Hkv/cp, (j+1)*Hkv/cp)`, the ones those query heads read. With `cp % Hkv == 0` each KV head is
    repeated `cp // Hkv` times first (`repeat_interleave`), so rank j gets KV head `j // (cp // Hkv)`,
    again the one its query heads read; autograd sums the repeats' gradients. The core's options pass through;
    `sinks` (one logit per query head) is sliced to this rank's heads.
    """

    def __init__(self, core: nn.Module, cp_mesh: DeviceMesh):
        super().__init__()
        self.core = core
        self.cp_mesh = cp_mesh

    def forward(self, q, k, v, cu_seqlens, max_seqlen, **options):
        cp = self.cp_mesh.size()
        if k.shape[1] < cp:
            k, v = (x.repeat_interleave(cp // x.shape[1], dim=1) for x in (k, v))
        if options.get("sinks") is not None:
            options["sinks"] = _shard(options["sinks"], self.cp_mesh)
        q, k, v = (tokens_to_heads(x, self.cp_mesh) for x in (q, k, v))
        return heads_to_tokens(self.core(q, k, v, cu_seqlens, max_seqlen, **options), self.cp_mesh)


def check_cp_batch(input_ids: torch.Tensor, cp: int, token_multiple: int) -> None:
    """Refuse what CP cannot split: padded `[B, S]` input, or a packed T that is not a multiple of tp*cp."""
    if input_ids.dim() != 1:
        raise ValueError(
            f"context parallelism (cp={cp}) takes packed [T] input_ids with cu_seqlens, got shape "
            f"{tuple(input_ids.shape)}; pack the padded batch first (dtllama.ops.pack, then pad_to_multiple)"
        )
    T = input_ids.shape[0]
    if T % token_multiple:
        raise ValueError(
            f"{T} packed tokens do not split over tp*cp={token_multiple} ranks; pad them with "
            f"dtllama.ops.pad_to_multiple(input_ids, cu_seqlens, {token_multiple}, labels)"
        )


def cp_batch_check(cp: int, token_multiple: int) -> Callable[[dict], None]:
    """`check_cp_batch` over a forward's bound arguments: the form `apply_batch_check` takes, so that parallelize's
    batch check (which runs before FSDP's first all-gather) raises it on every rank."""
    return lambda arguments: check_cp_batch(arguments["input_ids"], cp, token_multiple)


def _shard(x: torch.Tensor, cp_mesh: DeviceMesh) -> torch.Tensor:
    """This rank's contiguous slice `[r*T/cp, (r+1)*T/cp)` of a `[T, ...]` tensor."""
    n = x.shape[0] // cp_mesh.size()
    r = cp_mesh.get_local_rank()
    return x[r * n:(r + 1) * n]


class _GatherTokens(torch.autograd.Function):
    """All-gather of the CP ranks' token shards along dim 0; backward keeps this rank's slice of the gradient.
    For a loss every CP rank computes alike from all T tokens (e.g. per-sequence RL advantages and means): each
    rank's gradient of it is then the one-device gradient, and its own slice is what its shard contributed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cp_mesh: DeviceMesh) -> torch.Tensor:
        ctx.cp_mesh = cp_mesh
        out = x.new_empty((x.shape[0] * cp_mesh.size(), *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=cp_mesh.get_group())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _shard(grad, ctx.cp_mesh), None


def gather_tokens(x: torch.Tensor, cp_mesh: DeviceMesh) -> torch.Tensor:
    """`[T/cp, ...]` outputs of this rank's tokens -> `[T, ...]` of all tokens, in token order, differentiable:
    see `_GatherTokens` for which losses its backward is right for."""
    return _GatherTokens.apply(x, cp_mesh)


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh) -> nn.Module:
    """Shard the tokens of every forward over the 1-D `cp_mesh` (Ulysses), in place, where the model protocol says
    (decoder inputs, each layer's attention cores, the log-prob head's labels, token statistics); returns it. Call
    after TP.

    Batches CP cannot split are refused by `cp_batch_check`, which `parallelize` hands to its batch check,
    so that every rank raises before the first collective.
    """

    def shard_decoder_inputs(module, args):
        x, position_ids, cu_seqlens, max_seqlen = args
        # Token ids, or embeddings with images scattered in (a vision-language model), are sliced; a later pipeline
        # stage receives hidden states that are already this rank's token shard. Positions are `[T]`, or `[3, T]`
        # (mRoPE): the tokens are their last dimension.
        x = _shard(x, cp_mesh) if x.shape[0] == position_ids.shape[-1] else x
        return x, _shard(position_ids.movedim(-1, 0), cp_mesh).movedim(0, -1), cu_seqlens, max_seqlen

    plan = model.plan()
    model.get_submodule(plan.inputs).register_forward_pre_hook(shard_decoder_inputs)
    for layer in model.model.layers.values():
        for path in model.layer_plan(layer).attn_cores:
            parent, _, name = path.rpartition(".")
            owner = layer.get_submodule(parent)
            setattr(owner, name, UlyssesAttention(getattr(owner, name), cp_mesh))
    sum_token_statistics(model, plan, cp_mesh.get_group())  # e.g. the load-balance loss is over all tokens
    if plan.output == "logprobs" and model.logprobs_head is not None:
        def shard_labels(module, args):
            hidden, weight, labels, temperature, *rest = args
            if isinstance(temperature, torch.Tensor):  # one per token: its slice follows the labels'
                temperature = _shard(temperature, cp_mesh)
            return hidden, weight, _shard(labels, cp_mesh), temperature, *rest

        model.logprobs_head.register_forward_pre_hook(shard_labels)
    return model


__all__ = ["UlyssesAttention", "apply_cp", "check_cp_batch", "cp_batch_check", "gather_tokens", "heads_to_tokens",
           "tokens_to_heads"]
