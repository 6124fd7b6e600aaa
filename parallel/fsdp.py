"""FSDP2: `fully_shard` each decoder layer, then the root (embedding, final norm and head together).

Per-layer groups overlap one layer's all-gather with the previous layer's compute; the root group
holds the embedding and output head, which are needed first and last of every step.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from .options import FSDPOptions


def apply_fsdp(model: torch.nn.Module, mesh: DeviceMesh, options: FSDPOptions = FSDPOptions()) -> torch.nn.Module:
    """Shard `model` over `mesh` (1-D: FSDP; 2-D `(replicate, shard)`: HSDP). Returns it, now sharded."""
    kwargs = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=options.param_dtype, reduce_dtype=options.reduce_dtype),
        offload_policy=CPUOffloadPolicy() if options.cpu_offload else OffloadPolicy(),
    )
    reshard = options.reshard_after_forward
    if reshard is None:
        reshard = mesh.size() > 1  # one rank: measured 1.7% faster at the 1B shape for 1.7 GiB more
    layers = list(model.model.layers.values())
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again at once by backward: keep them gathered.
        fully_shard(layer, reshard_after_forward=reshard and i < len(layers) - 1, **kwargs)
    # The root holds the head, which backward needs first: never reshard it between the two.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model
