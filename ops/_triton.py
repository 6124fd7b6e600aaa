"""Whether the Triton kernels can run: Triton importable and not disabled by `DTLLAMA_TRITON=0`."""

from __future__ import annotations

import os
from functools import lru_cache


@lru_cache(maxsize=None)
def available() -> bool:
    if os.environ.get("DTLLAMA_TRITON", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x) -> bool:
    """Whether the CUDA kernels serve a tensor: it is on a CUDA device and Triton is available."""
    return x.is_cuda and available()


@lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count
