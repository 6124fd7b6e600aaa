"""Sharded training-state checkpoints through DCP: model, optimizer, LR schedule, data position, RNG.

Each rank writes only its shards; loading reshards onto whatever mesh the new run has (DTensor
placements are in the checkpoint metadata). A checkpoint is written into `step-N.partial` and
renamed to `step-N` by rank 0 only once every rank's data and the metadata are on disk, so a crash
mid-save leaves the previous checkpoints as they were and the partial folder is never loaded.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from dtllama.fsutil import on_rank0, rank, replace_dir

log = logging.getLogger(__name__)
_STEP = re.compile(r"^step-(\d+)$")


class TrainState(Stateful):
    """What DCP saves: sharded model and optimizer, plus the small state every rank holds."""

    def __init__(self, model, optimizer, scheduler=None, extra: dict | None = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.extra = extra if extra is not None else {}
        self.with_rng = True  # False when loading a checkpoint written by another world size

    def _rng_key(self) -> str:
        return f"rng.{rank()}of{dist.get_world_size() if dist.is_initialized() else 1}"

    def state_dict(self):
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        out = {
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "extra": dict(self.extra),
        }
        if self.with_rng:
            # RNG streams are per rank: kept under the rank's own key, restored on the same world size.
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            out[self._rng_key()] = rng
        return out

    def load_state_dict(self, state):
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.extra.clear()
        self.extra.update(state.get("extra", {}))
        rng = state.get(self._rng_key())
        if rng:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])


def check_compatible(path: str, model) -> None:
    """A ValueError naming the first parameter of `model` that the checkpoint at `path` lacks or holds in another
    shape (a checkpoint of another model), before DCP's load fails deep inside on some rank."""
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    for name, p in model.state_dict().items():
        entry = saved.get(f"train.model.{name}")
        size = getattr(entry, "size", None)
        if entry is None or (size is not None and tuple(size) != tuple(p.shape)):
            there = "is missing there" if entry is None else f"has shape {list(size)} there"
            raise ValueError(f"checkpoint {path} was written for another model: {name} {there}, shape "
                             f"{list(p.shape)} here; resume with the model and config it was written for, or start "
                             "in an empty --checkpoint-dir")


class Checkpointer:
    """`save(step, state)` and `load_latest(state)` in `folder`, keeping the last `keep_last` checkpoints."""

    def __init__(self, folder: str, keep_last: int = 2, async_save: bool = False):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be at least 1")
        self.folder, self.keep_last, self.async_save = os.fspath(folder), keep_last, async_save
        self._pending = None  # (future, step) of an async save not yet committed
        # An async save runs its collectives in a background thread: on a process group of its own, so that they
        # never interleave with training's on the same group (on a gloo-only CPU run that hung the next step).
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints (partial ones are ignored)."""
        if not os.path.isdir(self.folder):
            return []
        found = []
        for name in os.listdir(self.folder):
            m = _STEP.match(name)
            if m and os.path.exists(os.path.join(self.folder, name, ".metadata")):
                found.append(int(m.group(1)))
        return sorted(found)

    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"step-{step}")

    def save(self, step: int, state: TrainState) -> None:
        self.wait()
        partial = self.path(step) + ".partial"

        def fresh():
            shutil.rmtree(partial, ignore_errors=True)  # left by a crash: never complete
            os.makedirs(partial)

        on_rank0(fresh)
        if self.async_save:
            self._pending = (dcp.async_save({"train": state}, checkpoint_id=partial, process_group=self._group), step)
        else:
            dcp.save({"train": state}, checkpoint_id=partial)
            self._commit(step)

    def wait(self) -> None:
        """Block until an async save in flight is written and committed (call before exiting)."""
        if self._pending is not None:
            fut, step = self._pending
            self._pending = None
            fut.result()
            self._commit(step)

    def _commit(self, step: int) -> None:
        # dcp.save returns on rank 0 after every rank's data and the metadata are written.
        def commit():
            replace_dir(self.path(step) + ".partial", self.path(step))
            older = [s for s in self.steps() if s < step]  # never a newer one, e.g. of an earlier run
            for old in older[: max(len(older) - (self.keep_last - 1), 0)]:
                shutil.rmtree(self.path(old), ignore_errors=True)
            log.info("checkpoint %s complete", self.path(step))

        on_rank0(commit)

    def load_latest(self, state: TrainState) -> int | None:
        """Load the newest complete checkpoint into `state` (resharding as needed); its step, or None."""
        steps = self.steps()
        if not steps:
            return None
        path = self.path(steps[-1])
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        state.with_rng = any(k.startswith(f"train.{state._rng_key()}.") for k in saved)
        if not state.with_rng:
            log.warning("%s was written by another world size: RNG states are not restored", path)
        try:
            dcp.load({"train": state}, checkpoint_id=path)
        finally:
            state.with_rng = True
        return steps[-1]
