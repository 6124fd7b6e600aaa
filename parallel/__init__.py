"""Parallelisms applied to a dtllama model from outside, one module and one `apply_*` each."""

from .fsdp import apply_fsdp

__all__ = ["apply_fsdp"]
