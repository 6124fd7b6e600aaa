"""Folder moves that never leave a half-written result, and rank-0 file work whose failure every rank sees."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager

import torch.distributed as dist


def rank() -> int:
    """This process's rank, 0 without a process group."""
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


@contextmanager
def staged_dir(dst: str, replace: bool = True):
    """Yield a fresh folder beside `dst` to write into; it becomes `dst` only when the block completes
    and is deleted otherwise. `replace=False` keeps an existing `dst` (the first writer wins)."""
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(dst) + "-", dir=parent)
    try:
        yield tmp
        if replace:
            replace_dir(tmp, dst)
        else:
            try:
                os.rename(tmp, dst)  # atomic; fails if another writer got there first
            except OSError:
                if not os.path.exists(dst):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def on_rank0(fn, *args):
    """Run file-system work on rank 0 and return its result on every rank; its error is raised on
    every rank, so that no rank is left waiting in the next collective for a peer that failed."""
    box = [None, None]  # error, result
    if rank() == 0:
        try:
            box[1] = fn(*args)
        except Exception as e:  # re-raised below, on every rank
            box[0] = f"{type(e).__name__}: {e}"
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise RuntimeError(f"rank 0 failed: {box[0]}")
    return box[1]
