"""Mixed precision without FSDP, where there is no data parallelism: fp32 parameters, low-precision activations.

FSDP2 carries mixed precision on a data-parallel mesh (all-gathers in bf16, reduce-scatters in fp32).
On a single rank its all-gather and reduce-scatter are copies: at the Llama-3.2-1B shape on one H200
they cost about 18 ms a step (copy-in and copy-out of the flat buffers, `chunk_cat`, the casts), where
casting each parameter at its use costs about 4 (a read of fp32 and a write of bf16 forward, the
reverse for the gradient), as autocast does for torchtitan on one GPU.

The same holds for tensor parallel and pipeline stages without data parallelism (a 1-rank FSDP mesh
beside `tp` / `pp`). So there the parameters stay fp32 (what the optimizer steps and checkpoints hold),
the activations run in `dtype` from the embedding on (`LlamaModel.compute_dtype`), and every module
casts its parameters to the activations' dtype where it uses them (`dtllama.models.llama.Linear`, `RMSNorm`,
the heads, a pipeline stage's head): the cast's backward gives the fp32 parameter an fp32 gradient, to
which a schedule's microbatches add up. Inside a compiled block the casts are fused kernels that the
partitioner recomputes for backward instead of keeping low-precision copies.

The numbers are FSDP's mixed precision (parameters rounded to `dtype`, activations in `dtype`, fp32
gradients), with differences for the better: the embedding's gradient is accumulated in fp32 (FSDP
accumulates repeated tokens' rows in bf16 before its fp32 reduction), and under TP the gradients of
replicated parameters (the sequence-parallel norms) are summed over the TP ranks in fp32.
"""

from __future__ import annotations

import torch


def supports_casts(model: torch.nn.Module) -> bool:
    """Whether `model` casts at use: a dense dtllama model or stage (`LlamaModel` reads `compute_dtype`). Llama 4,
    even with no MoE layer, keeps FSDP's mixed precision: its modules hold plain `nn.Linear`s."""
    from dtllama.models.llama import LlamaModel

    return isinstance(getattr(model, "model", None), LlamaModel)


def apply_mixed_precision(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Run `model` (a dense dtllama model or pipeline stage with fp32 parameters, plain or TP DTensors) with
    `dtype` activations."""
    if not supports_casts(model):
        raise TypeError(f"{type(model).__name__} does not cast its parameters at use (only dense dtllama models "
                        "do); give it mixed precision through FSDP: parallelize(..., fsdp=FSDPOptions(param_dtype=))")
    if not dtype.is_floating_point:
        raise ValueError(f"mixed precision dtype {dtype} is not a floating dtype; use torch.bfloat16 or torch.float16")
    model.model.compute_dtype = dtype
    return model
