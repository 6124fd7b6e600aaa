"""Gradient-norm clipping over parameters that live on different meshes (or none).

`torch.nn.utils.get_total_norm` needs all gradients on one mesh, so the norm is taken per mesh
group, each made a plain number with `full_tensor()`, and the groups combined.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip in place like `torch.nn.utils.clip_grad_norm_`; returns the total norm (a plain tensor)."""
    params = [p for p in parameters if p.grad is not None]
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
        groups.setdefault(key, []).append(p.grad)
    norms = []
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads, norm_type)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    if not norms:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), norm_type)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
