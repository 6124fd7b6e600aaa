"""FSDP2: `fully_shard` each decoder layer, then the root (embedding, final norm and head together).

Per-layer groups overlap one layer's all-gather with the previous layer's compute; the root group
holds the embedding and output head, which are needed first and last of every step.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard


def apply_fsdp(
    model: torch.nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> torch.nn.Module:
    """Shard `model` over `mesh` (1-D: FSDP; 2-D `(replicate, shard)`: HSDP). Returns it, now sharded."""
    kwargs = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        offload_policy=CPUOffloadPolicy() if cpu_offload else None,
    )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    layers = list(model.model.layers.values())
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again at once by backward: keep them gathered.
        fully_shard(layer, reshard_after_forward=reshard_after_forward and i < len(layers) - 1, **kwargs)
    # The root holds the head, which backward needs first: never reshard it between the two.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model
