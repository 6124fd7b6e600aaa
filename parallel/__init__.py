"""Parallelisms applied to a dtllama model from outside, one module and one `apply_*` each."""

from .ac import AC_MODES, apply_ac
from .compile import apply_compile
from .dims import ParallelDims, valid_tp_degrees
from .fsdp import apply_fsdp
from .grad_clip import clip_grad_norm_
from .parallelize import parallelize
from .tp import apply_tp

__all__ = [
    "AC_MODES", "ParallelDims", "apply_ac", "apply_compile", "apply_fsdp", "apply_tp", "clip_grad_norm_",
    "parallelize", "valid_tp_degrees",
]
