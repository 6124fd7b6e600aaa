"""Per-block `torch.compile(fullgraph=True)`: every decoder layer is compiled in place
(`nn.Module.compile`, so parameter names do not change); identical layers share one compiled graph."""

from __future__ import annotations

import torch


def apply_compile(model: torch.nn.Module, backend: str = "inductor") -> None:
    for layer in model.model.layers.values():
        layer.compile(backend=backend, fullgraph=True)
