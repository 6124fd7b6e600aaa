"""Cutting a model into this rank's pipeline stages, and the one weight two stages share.

The family cuts itself (`model.cut`, the model protocol): a stage is a model of the same class holding some layers,
the embedding if first, the final norm and head if last, sharing the modules of the whole so parameters keep their
HF names. With tied embeddings the last stage's head reads `model.embed_tokens.weight`, so the last stage keeps a
copy of the table: both copies start equal (per-name init, or the same checkpoint tensor), their gradients are
summed after each step over the pair of pipeline ranks holding them (Megatron's embedding group), and they take the
same optimizer step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from dtllama.models.blocks import StageIO

from ..dims import ParallelDims


def rank_part(model: nn.Module, layers: list[list[int]], mine: list[int]) -> nn.Module:
    """This rank's part of the model: the layers of its stages (and the embedding / head where they are)."""
    n = len(layers)
    return model.cut(sorted(i for s in mine for i in layers[s]), 0 in mine, n - 1 in mine)


def stage_module(part: nn.Module, layers: list[int], stage: int, n_stages: int, io: StageIO) -> nn.Module:
    """One stage of `part`, whose forward is a pipeline stage's (token ids or hidden states in, tensors out)."""
    return part.cut(layers, stage == 0, stage == n_stages - 1, stage=io)


class TiedEmbedding:
    """The gradient sum of the embedding table that the first stage (lookups) and the last stage (the tied head)
    each hold a copy of, when they live on different pipeline ranks; the last stage's copy is left out of the
    gradient norm (`grad_clip`), which would otherwise count it twice."""

    COPY_MARK = "_dtllama_tied_copy"

    def __init__(self, group, is_copy: bool):
        self.group, self.is_copy = group, is_copy

    @staticmethod
    def build(model: nn.Module, dims: ParallelDims, first_rank: int, last_rank: int) -> "TiedEmbedding | None":
        """The pair groups (pp ranks `first_rank`, `last_rank` at every other mesh coordinate), created by every rank
        in one order; None where the model is untied or one rank holds both stages (the copy is one module)."""
        if not model.plan().tied or first_rank == last_rank:
            return None
        mesh = dims.mesh("world").mesh
        firsts, lasts = mesh[first_rank].flatten().tolist(), mesh[last_rank].flatten().tolist()
        me, mine = dist.get_rank(), None
        for a, b in zip(firsts, lasts):
            group = dist.new_group([a, b])
            if me in (a, b):
                mine = TiedEmbedding(group, is_copy=me == b)
        return mine

    @torch.no_grad()
    def sum_gradients(self, part: nn.Module) -> None:
        weight = part.model.embed_tokens.weight
        if weight.grad is not None:
            grad = weight.grad
            dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=self.group)
        setattr(weight, self.COPY_MARK, self.is_copy)
