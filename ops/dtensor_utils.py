"""The one place that calls DTensor's private layout helper (its name and home moved across torch versions)."""

from __future__ import annotations

from torch.distributed.tensor import DTensor


def local_shape_and_offset(t: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`(shape, global offset)` of this rank's slice of `t`: which rows/columns of the full tensor it holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
