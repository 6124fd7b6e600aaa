"""Agree on a batch's validity on every rank before the step's first collective.

A bad batch on one rank (a label outside the vocabulary, `cu_seqlens` that do not end at T, a
sequence longer than `max_seqlen`) would raise on that rank only, and its peers would wait forever
in the next all-gather. So the root module validates its inputs first, then all ranks all-reduce
one flag; if any rank failed, they exchange the messages and every rank raises the same error.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from dtllama.models.blocks import MEDIA
from dtllama.ops import prepare_batch


def agree_on_error(error: str | None, mesh: DeviceMesh) -> None:
    """Raise the same ValueError on every rank of the 1-D `mesh` if any rank passes an error message."""
    group = mesh.get_group()
    flag = torch.tensor([error is not None], dtype=torch.int32, device=mesh.device_type)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not flag.item():
        return
    errors: list[str | None] = [None] * mesh.size()
    dist.all_gather_object(errors, error, group=group)
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    raise ValueError(f"bad batch on {len(bad)} of {mesh.size()} ranks; rank {bad[0][0]}: {bad[0][1]}")


def apply_batch_check(model: nn.Module, mesh: DeviceMesh,
                      layout_checks: Sequence[Callable[[dict], None]] = ()) -> nn.Module:
    """Validate `model`'s forward inputs and agree over `mesh` (all ranks) before anything else runs.

    `layout_checks` take the bound forward arguments and raise a ValueError for a batch this layout cannot
    split (context parallelism: `cp.cp_batch_check`), so that error too reaches every rank.

    The hook is prepended, so it runs before FSDP's root all-gather and any tensor-parallel hook.
    The model validates again inside forward; that costs a few host syncs per step, no collective.
    """
    signature = inspect.signature(model.forward)
    vocab_size = model.config.vocab_size

    def hook(module, args, kwargs):
        a = signature.bind(*args, **kwargs).arguments
        error = None
        try:
            batch = prepare_batch(a["input_ids"], vocab_size, a.get("position_ids"), a.get("cu_seqlens"),
                                  a.get("max_seqlen"), a.get("labels"), a.get("attention_mask"))
            model.check_media(batch.input_ids, batch.cu_seqlens, {k: a.get(k) for k in MEDIA})
            for check in layout_checks:
                check(a)
        except Exception as e:  # noqa: BLE001 - any failure of this rank's batch must reach its peers
            error = f"{type(e).__name__}: {e}"
        agree_on_error(error, mesh)

    model.register_forward_pre_hook(hook, prepend=True, with_kwargs=True)
    return model
