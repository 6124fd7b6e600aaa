"""Activation checkpointing per decoder layer: `none`, `full` (recompute the whole layer in
backward) or `selective` (keep matmul and SDPA outputs, recompute the cheap elementwise ops;
FlexAttention, a higher-order op, is recomputed)."""

from __future__ import annotations


import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

AC_MODES = ("none", "full", "selective")
_SAVE = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_mm.default,
}


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_policy)


def apply_ac(model: torch.nn.Module, mode: str) -> None:
    """Wrap each decoder layer; `state_dict` keys keep their HF names (the wrapper strips its prefix)."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is unknown; choose one of {list(AC_MODES)}")
    if mode == "none":
        return
    layers = model.model.layers
    for name, layer in list(layers.items()):
        kwargs = {"preserve_rng_state": False}
        if mode == "selective":
            kwargs["context_fn"] = _selective_contexts
        layers[name] = checkpoint_wrapper(layer, **kwargs)
