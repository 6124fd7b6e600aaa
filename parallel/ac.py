"""Activation checkpointing per decoder layer: `none`, `full` (recompute the whole layer in backward)
or `selective`.

`selective` is torchtitan's op-level policy (0.2.2: `_op_sac_save_list`, `_apply_op_sac`): keep the
outputs of the compute-bound ops, which cost many flops per byte kept, and recompute the memory-bound
rest, which costs about the bytes it would have kept. Saved (MUST_SAVE):
- every other matmul of a layer in call order (`mm`, `addmm`, `_scaled_mm`): the q, v, gate and down
  projections; k, o and up are recomputed. Recomputing every projection would add a third to the
  layer's matmul flops; half is torchtitan's trade between memory and step time;
- the attention forward of every backend `dtllama.ops.varlen_attention` dispatches to (`_ATTENTION`,
  `_HOPS` below): the layer's most compute per byte of output (O(T*S) flops for O(T) bytes);
- the sequence-parallel reduce-scatter and Ulysses' all-to-alls: recomputing a collective puts another
  one on the critical path (attention's backward needs q, k, v in the head layout);
- `aten.max`: low-precision (fp8) training reads its output for scales; torchtitan keeps it.
Recomputed (PREFER_RECOMPUTE): the rest, memory bound: RMSNorms, RoPE, SwiGLU's silu and product, casts,
views, the sequence-parallel all-gather.

Eager, the checkpoint's dispatch mode calls the policy once per op of the forward; under per-block
`torch.compile`, AOTAutograd calls it while tracing the layer and the partitioner saves the MUST_SAVE
nodes backward needs. The matmul counter is per layer call (a fresh one per `context_fn`) and separate
for forward and recompute, so the two agree on which matmul is which. Eager keeps a saved output even
where backward does not need it (the down projection's); compiled does not. Known gap (not the
policy's): with the `flex` backend a compiled layer under any checkpoint does not trace ("HOP: Unsafe
side effect": `create_block_mask` runs inside the checkpointed layer).
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

AC_MODES = ("none", "full", "selective")

_MATMULS = ("aten::mm", "aten::addmm", "aten::_scaled_mm")
# Save one matmul output in `_MM_PERIOD` (torchtitan: every other one).
_MM_PERIOD = 2

# Attention forwards, by backend, as the checkpoint's dispatch mode sees them; names absent from this install are
# skipped. `varlen`: torch's custom op (the FlashAttention-2 / cuDNN call inside it is not seen separately).
# `flash`: flash-attn's custom ops (releases that call their extension outside the dispatcher are recomputed
# whatever the policy). `sdpa`: every `aten::_scaled_dot_product_*` variant (flash, efficient, cuDNN, CPU flash,
# overrideable, math). The bare kernels are listed for a torch whose `varlen_attn` calls them without its custom op.
_ATTENTION = (
    "dtllama::fa4_varlen_fwd",  # fa4: FlashAttention-4 as dtllama's custom op
    "torch_attn::_varlen_attn",  # varlen: torch.nn.attention.varlen.varlen_attn
    "flash_attn::_flash_attn_varlen_forward",  # flash: flash_attn_varlen_func
    "flash_attn::_flash_attn_forward",
    "aten::_scaled_dot_product_flash_attention",  # sdpa
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_fused_attention_overrideable",
    "aten::_scaled_dot_product_attention_math",
    "aten::_flash_attention_forward",  # the kernels behind varlen_attn, should a torch call them bare
    "aten::_efficient_attention_forward",
    "aten::_cudnn_attention_forward",
)
_OTHER = (
    "_c10d_functional::reduce_scatter_tensor",  # sequence parallel's reduce-scatter
    "_c10d_functional::all_to_all_single",  # Ulysses' all-to-alls (q, k, v in; the output back)
    "aten::max",
)
# flex: the higher-order op `flex_attention` inside a compiled layer. In an eager layer dtllama's compiled
# FlexAttention kernel would show as `inductor_compiled_code` only under inductor's
# `wrap_inductor_compiled_regions`, which ops.attention does not use (its recompute fails on torch 2.11): an eager
# layer recomputes flex attention.
_HOPS = ("flex_attention", "inductor_compiled_code")


def _op(qualname: str):
    """`torch.ops.ns.name.default`, or None when this install has no such op."""
    ns, name = qualname.split("::")
    try:
        return getattr(getattr(getattr(torch.ops, ns), name), "default")
    except (AttributeError, RuntimeError):
        return None


def _import_attention_ops() -> None:
    """Register the custom ops of the attention libraries (ops.attention imports them anyway)."""
    try:
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        pass
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        pass


@lru_cache(maxsize=None)
def matmul_ops() -> frozenset:
    return frozenset(op for op in map(_op, _MATMULS) if op is not None)


@lru_cache(maxsize=None)
def saved_ops() -> frozenset:
    """The ops whose outputs `selective` always saves (matmuls aside)."""
    _import_attention_ops()
    ops = {op for op in map(_op, _ATTENTION + _OTHER) if op is not None}
    import torch._higher_order_ops as hops

    ops.update(getattr(hops, name) for name in _HOPS if hasattr(hops, name))
    return frozenset(ops)


def _policy_fn():
    """A fresh policy for one call of a checkpointed layer (its own matmul counters)."""
    mm_count = defaultdict(int)
    matmuls, saved = matmul_ops(), saved_ops()

    def policy(ctx, op, *args, **kwargs):
        if op in matmuls:
            n = mm_count[ctx.is_recompute]
            mm_count[ctx.is_recompute] += 1
            return CheckpointPolicy.MUST_SAVE if n % _MM_PERIOD == 0 else CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _selective_contexts():
    return create_selective_checkpoint_contexts(_policy_fn())


def apply_ac(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Wrap each decoder layer, in place; `state_dict` keys keep their HF names (the wrapper strips its prefix)."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is unknown; choose one of {list(AC_MODES)}")
    if mode == "none":
        return model
    layers = model.model.layers
    for name, layer in list(layers.items()):
        kwargs = {"preserve_rng_state": False}
        if mode == "selective":
            kwargs["context_fn"] = _selective_contexts
        layers[name] = checkpoint_wrapper(layer, **kwargs)
    return model
