"""Mixed precision without FSDP, where there is no data parallelism: fp32 parameters, low-precision activations.

FSDP2 carries mixed precision on a data-parallel mesh (all-gathers in bf16, reduce-scatters in fp32). On a single
rank its all-gather and reduce-scatter are copies, where casting each parameter at its use costs a fraction of
them, as autocast does for torchtitan on one GPU (README: GPU figures). The same holds for tensor parallel and
pipeline stages without data parallelism (a 1-rank FSDP mesh beside `tp` / `pp`).

So there, for a model whose modules cast their parameters at use (the model protocol's `casts_at_use`), the
parameters stay fp32 (what the optimizer steps and checkpoints hold), the activations run in `dtype` from the
embedding on, and the cast's backward gives each fp32 parameter an fp32 gradient, to which a schedule's
microbatches add up. Inside a compiled block the casts are fused kernels that the partitioner recomputes for
backward instead of keeping low-precision copies. The numbers are FSDP's mixed precision (parameters rounded to
`dtype`, activations in `dtype`, fp32 gradients), with differences for the better: the embedding's gradient is
accumulated in fp32, and under TP the gradients of replicated parameters (the sequence-parallel norms) are summed
over the TP ranks in fp32.
"""

from __future__ import annotations

import torch


def supports_casts(model: torch.nn.Module) -> bool:
    """Whether `model`'s modules cast their parameters at use (the model protocol's `casts_at_use`)."""
    return model.plan().casts_at_use


def apply_mixed_precision(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Run `model` (or a pipeline stage of it; fp32 parameters, plain or TP DTensors) with `dtype` activations: the
    embedding's output is cast to `dtype`, and a stage without the embedding receives `dtype` hidden states."""
    if not supports_casts(model):
        raise TypeError(f"{type(model).__name__} does not cast its parameters at use; give it mixed precision "
                        "through FSDP: parallelize(..., fsdp=FSDPOptions(param_dtype=))")
    if not dtype.is_floating_point:
        raise ValueError(f"mixed precision dtype {dtype} is not a floating dtype; use torch.bfloat16 or torch.float16")

    def cast(x):
        return x.to(dtype) if x.is_floating_point() else x

    decoder = model.model
    decoder.register_forward_pre_hook(lambda mod, args: (cast(args[0]), *args[1:]))
    if decoder.embed_tokens is not None:
        decoder.embed_tokens.register_forward_hook(lambda mod, args, out: cast(out))
    return model
