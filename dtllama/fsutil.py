"""Folder moves that never leave a half-written result, and rank-0 file work whose failure every rank sees."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch.distributed as dist


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def replace_dir(src: str, dst: str) -> None:
    """Move the complete folder `src` to `dst`; an existing `dst` is moved aside first and deleted
    last, so a crash at any point leaves a complete folder (old or new) at or beside `dst`."""
    old = None
    if os.path.exists(dst):
        old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(dst) + "-", dir=os.path.dirname(os.path.abspath(dst)))
        os.replace(dst, os.path.join(old, "x"))
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def on_rank0(fn, *args):
    """Run file-system work on rank 0 and raise its error on every rank, so that no rank is left
    waiting in the next collective for a peer that failed."""
    err = [None]
    if _rank() == 0:
        try:
            fn(*args)
        except Exception as e:  # re-raised below, on every rank
            err[0] = f"{type(e).__name__}: {e}"
    if dist.is_initialized():
        dist.broadcast_object_list(err, src=0)
    if err[0] is not None:
        raise RuntimeError(f"rank 0 failed: {err[0]}")
