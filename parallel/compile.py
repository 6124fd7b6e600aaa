"""Per-block `torch.compile(fullgraph=True)`, in place (`nn.Module.compile`, so parameter names do not change):
each decoder layer whole, or the parts its plan names (an MoE layer: norms, attention and shared expert, each on
its own). Identical layers share one compiled graph.

An MoE layer's routed experts stay eager: their FSDP and dispatch hooks cannot be traced into a full graph (FSDP2's
hooks are dynamo-disabled), and their row counts are data-dependent; torchtitan compiles its MoE blocks so too.
The router is one `nn.Linear`, with nothing to fuse."""

from __future__ import annotations

import torch


def apply_compile(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    for layer in model.model.layers.values():
        parts = model.layer_plan(layer).compile_parts
        for part in (layer,) if parts is None else (layer.get_submodule(p) for p in parts):
            part.compile(backend=backend, fullgraph=True)
    return model
