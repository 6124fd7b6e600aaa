"""Activation checkpointing per decoder layer: `none`, `full` (recompute the whole layer in backward)
or `selective`.

`selective` is torchtitan's op-level policy (0.2.2: `_op_sac_save_list`, `_apply_op_sac`): keep the
outputs of the compute-bound ops, which cost many flops per byte kept, and recompute the memory-bound
rest, which costs a pass over memory per byte freed.

Saved (MUST_SAVE):
- every other matmul of a layer, counted in call order (`mm`, `addmm`, `_scaled_mm`): the 1st, 3rd,
  5th and 7th, i.e. the q, v, gate and down projections; k, o and up are recomputed. Recomputing a
  projection costs in_features flops (2048 at the 1B shape) per element freed, where the elementwise
  recompute below costs a few bytes of traffic; recomputing all of them would add a third to the
  layer's matmul flops (forward + backward). Half is torchtitan's trade-off: at the 1B shape it frees
  5 GiB more than saving every matmul, for 5-7% more of the step.
- the attention forward of every backend `dtllama.ops.varlen_attention` dispatches to: the layer's
  largest compute per byte of output (O(T*S) flops for O(T) bytes) and the dearest op to recompute.
  The op the checkpoint's dispatch mode sees, by backend: `fa4`: dtllama's custom op
  `dtllama::fa4_varlen_fwd`; `varlen`: the custom op `torch_attn::_varlen_attn` (the FlashAttention-2 / cuDNN call inside it is
  not seen separately); `flash`: flash-attn's custom ops `flash_attn::_flash_attn_varlen_forward` /
  `_flash_attn_forward` (releases that call their extension outside the dispatcher are recomputed
  whatever the policy); `flex`: the higher-order op `flex_attention` inside a compiled layer, or, in
  an eager layer, `inductor_compiled_code` (dtllama's compiled FlexAttention kernel, visible only when
  compiled with inductor's `wrap_inductor_compiled_regions`, which `ops.attention` does not use: with it
  the recompute fails on torch 2.11; so in an eager layer flex attention is recomputed); `sdpa`: the
  `aten::_scaled_dot_product_*` variants (flash, efficient, cuDNN, CPU flash, overrideable). The bare
  kernels (`aten::_flash_attention_forward`, ...) are listed too, for a torch whose `varlen_attn`
  calls them without its custom op.
- the sequence-parallel reduce-scatter (`_c10d_functional.reduce_scatter_tensor`): recomputing it is
  a second collective on the critical path, for an output of only T/tp tokens. Likewise Ulysses'
  all-to-alls (`_c10d_functional.all_to_all_single`): attention's backward needs its q, k, v in the
  head layout, and recomputing them would cost three more all-to-alls per layer.
- `aten.max`: cheap, but low-precision (fp8) training reads its output for scales; torchtitan keeps it.

Recomputed (PREFER_RECOMPUTE): everything else: the RMSNorms (`dtllama::rms_norm`, one read of x and
one write of y), RoPE, SwiGLU's silu and product, casts, views, the sequence-parallel all-gather.
These are memory bound, so recomputing them costs about the bytes they would have kept.

Eager and compiled: the policy is called once per op of the forward by the checkpoint's dispatch mode;
under per-block `torch.compile` (which wraps the checkpointed layer), AOTAutograd calls the same
policy while tracing the layer, tags each node, and the partitioner saves the MUST_SAVE nodes that
backward needs and recomputes the others. The matmul counter is per layer call (a fresh one for each
`context_fn`), and separate for forward and recompute on a torch that still calls the policy in
recompute, so the two agree on which matmul is which. In eager mode a saved output is kept even when
backward does not need it (the down projection's: 1/4 of the gate's size); compiled, it is not.
Known gap (not the policy's): with the `flex` backend a compiled layer under any checkpoint does not
trace ("HOP: Unsafe side effect": `create_block_mask` runs inside the checkpointed layer).

Measured (Llama-3.2-1B shape, B=4 x 4096, per-block compile, one H200, torch 2.11): 7.1-7.3% of
tokens/s for 12.75 GiB of peak memory (1.74-1.79 GiB per %); torchtitan 0.2.2's policy on its model,
8.8-9.1% for 13.06 GiB (1.44-1.48 GiB per %). Saving every matmul instead costs 0.5-2.5% for 7.5 GiB.
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

# Attention forwards, by backend (see the module docstring); names absent from this install are skipped.
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
_HOPS = ("flex_attention", "inductor_compiled_code")  # flex: compiled layer / eager layer


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
