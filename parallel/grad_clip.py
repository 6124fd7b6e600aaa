"""Gradient-norm clipping over parameters that live on different meshes (or none).

`torch.nn.utils.get_total_norm` needs all gradients on one mesh, so the norm is taken per mesh
group, each made a plain number with `full_tensor()`, and the groups combined.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, pp_mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Clip in place like `torch.nn.utils.clip_grad_norm_`; returns the total norm (a plain tensor).

    Under pipeline parallelism each rank holds other layers: pass `pp_mesh` to combine the ranks' norms. The last
    stage's copy of a tied embedding (`pp.stages.TiedEmbedding`) is clipped but not counted: the first stage's is."""
    params = [p for p in parameters if p.grad is not None]
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
        groups.setdefault(key, []).append(p)
    norms = []
    for group in groups.values():
        counted = [p.grad for p in group if not getattr(p, "_dtllama_tied_copy", False)]
        if not counted:
            continue
        n = torch.nn.utils.get_total_norm(counted, norm_type)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), norm_type) if norms else torch.tensor(0.0)
    if pp_mesh is not None and pp_mesh.size() > 1:
        total = total.to(pp_mesh.device_type)
        if math.isinf(norm_type):
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=pp_mesh.get_group())
        else:
            total = total.pow(norm_type)
            dist.all_reduce(total, group=pp_mesh.get_group())
            total = total.pow(1.0 / norm_type)
    if not params:
        return total
    for group in groups.values():  # one foreach op per mesh: DTensor ops take one mesh (e.g. experts on `ep`)
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
