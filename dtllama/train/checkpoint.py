"""Sharded training-state checkpoints through DCP: model, optimizer, LR schedule, data position, RNG.

Each rank writes only its shards; loading reshards onto whatever mesh the new run has (DTensor
placements are in the checkpoint metadata). A checkpoint is written into `step-N.partial` and
renamed to `step-N` by rank 0 only once every rank's data and the metadata are on disk, so a crash
mid-save leaves the previous checkpoints as they were and the partial folder is never loaded.

Before the rename, the ranks digest the data files (size and CRC32, each rank a share) into `.manifest.json`.
Loading verifies the newest checkpoint against it (and against the byte ranges DCP's metadata points into) and, if a
file is missing, cut short or corrupted, says which and falls back to the previous complete checkpoint. A save that
fails part-way (a full disk) removes its partial folder; `on_save_error` says whether the run stops or goes on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from dtllama.fsutil import on_rank0, rank, replace_dir

log = logging.getLogger(__name__)
_STEP = re.compile(r"^step-(\d+)$")
MANIFEST = ".manifest.json"
SAVE_ERRORS = ("stop", "continue")


def _digest(path: str) -> tuple[int, int]:
    """`(size, crc32)` of a file, read in 16 MiB blocks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            crc, size = zlib.crc32(block, crc), size + len(block)
    return size, crc


def _my_share(items: list) -> list:
    """This rank's share of work every rank can do (rank r takes items r, r + world, ...)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return items[rank()::world]


def _gather(values: list) -> list:
    """Every rank's list, concatenated, on every rank."""
    if not dist.is_initialized():
        return values
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return [v for part in out for v in part]


def _data_files(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n not in (MANIFEST, ".metadata") and
                  os.path.isfile(os.path.join(folder, n)))


def _problems(path: str) -> list[str]:
    """What is wrong with the checkpoint folder `path` (collective: each rank checks a share of the files; every
    rank gets every finding): the metadata unreadable, a file the manifest or the metadata names missing, shorter
    than the bytes the metadata reads from it, or not the bytes the manifest recorded."""
    try:
        meta = dcp.FileSystemReader(path).read_metadata()
        manifest = {}
        if os.path.exists(os.path.join(path, MANIFEST)):
            with open(os.path.join(path, MANIFEST)) as f:
                manifest = json.load(f)["files"]
        needed: dict[str, int] = {}
        for item in (meta.storage_data or {}).values():
            name = os.fspath(item.relative_path)
            needed[name] = max(needed.get(name, 0), item.offset + item.length)
    except Exception as e:  # noqa: BLE001 - any unreadable metadata or manifest is the finding
        return _gather([f".metadata or {MANIFEST} unreadable ({type(e).__name__}: {e})"] if rank() == 0 else [])
    found = []
    for name in _my_share(sorted(set(needed) | set(manifest))):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            found.append(f"{name} is missing")
            continue
        size, crc = _digest(file) if name in manifest else (os.path.getsize(file), None)
        if size < needed.get(name, 0):
            found.append(f"{name} has {size} bytes; the metadata reads up to byte {needed[name]}")
        elif name in manifest and (size, crc) != (manifest[name]["size"], manifest[name]["crc32"]):
            found.append(f"{name} has {size} bytes of CRC32 {crc:08x}; it was written as {manifest[name]['size']} "
                         f"bytes of CRC32 {manifest[name]['crc32']:08x}")
    return _gather(found)


class CheckpointSaveError(RuntimeError):
    """A save that failed on some rank (every rank raises it); the previous checkpoints are untouched."""


class TrainState(Stateful):
    """What DCP saves: sharded model and optimizer, plus the small state every rank holds. `others` names more
    (model, optimizer) pairs trained in the same run (PPO's critic beside its actor), saved under their names."""

    def __init__(self, model, optimizer, scheduler=None, extra: dict | None = None,
                 others: dict[str, tuple] | None = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.extra = extra if extra is not None else {}
        self.others = dict(others or {})
        for name in self.others:
            if name in ("model", "optimizer", "scheduler", "extra") or name.startswith("rng."):
                raise ValueError(f"TrainState others: {name!r} is a key of the state itself; name the pair "
                                 "otherwise (e.g. 'critic')")
        self.with_rng = True  # False when loading a checkpoint written by another world size

    def _rng_key(self) -> str:
        return f"rng.{rank()}of{dist.get_world_size() if dist.is_initialized() else 1}"

    def models(self) -> dict[str, torch.nn.Module]:
        """Every model of the state under the key prefix of its parameters in a checkpoint."""
        return {"model": self.model, **{f"{name}.model": m for name, (m, _) in self.others.items()}}

    def state_dict(self):
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        out = {
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "extra": dict(self.extra),
        }
        for name, (m, o) in self.others.items():
            out[name] = dict(zip(("model", "optimizer"), get_state_dict(m, o)))
        if self.with_rng:
            # RNG streams are per rank: kept under the rank's own key, restored on the same world size.
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            out[self._rng_key()] = rng
        return out

    def load_state_dict(self, state):
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        for name, (m, o) in self.others.items():
            set_state_dict(m, o, model_state_dict=state[name]["model"], optim_state_dict=state[name]["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.extra.clear()
        self.extra.update(state.get("extra", {}))
        rng = state.get(self._rng_key())
        if rng:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])


def check_compatible(path: str, model, prefix: str = "model") -> None:
    """A ValueError naming the first parameter of `model` that the checkpoint at `path` lacks or holds in another
    shape (a checkpoint of another model), before DCP's load fails deep inside on some rank. `prefix`: where the
    model's keys sit in the state (`TrainState.models`)."""
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    for name, p in model.state_dict().items():
        entry = saved.get(f"train.{prefix}.{name}")
        size = getattr(entry, "size", None)
        if entry is None or (size is not None and tuple(size) != tuple(p.shape)):
            there = "is missing there" if entry is None else f"has shape {list(size)} there"
            which = "" if prefix == "model" else f" ({prefix.split('.')[0]})"
            raise ValueError(f"checkpoint {path} was written for another model: {name}{which} {there}, shape "
                             f"{list(p.shape)} here; resume with the model and config it was written for, or start "
                             "in an empty --checkpoint-dir")


class Checkpointer:
    """`save(step, state)` and `load_latest(state)` in `folder`, keeping the last `keep_last` checkpoints.
    `on_save_error`: "stop" raises `CheckpointSaveError` when a save fails (on every rank), "continue" logs it and
    trains on without that checkpoint; either way its partial folder is removed."""

    def __init__(self, folder: str, keep_last: int = 2, async_save: bool = False, on_save_error: str = "stop"):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be at least 1")
        if on_save_error not in SAVE_ERRORS:
            raise ValueError(f"on_save_error={on_save_error!r}: choose one of {', '.join(SAVE_ERRORS)}")
        self.folder, self.keep_last, self.async_save = os.fspath(folder), keep_last, async_save
        self.on_save_error = on_save_error
        self.skipped: list[tuple[str, list[str]]] = []  # broken checkpoints load_latest passed over, and why
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

    def save(self, step: int, state: TrainState) -> bool:
        """Write the checkpoint of `step` (in the background with `async_save`); False if it failed and
        `on_save_error` is "continue"."""
        ok = self.wait()
        partial = self.path(step) + ".partial"

        def fresh():
            shutil.rmtree(partial, ignore_errors=True)  # left by a crash: never complete
            os.makedirs(partial)

        on_rank0(fresh)
        if self.async_save:
            self._pending = (dcp.async_save({"train": state}, checkpoint_id=partial, process_group=self._group), step)
            return ok
        try:
            dcp.save({"train": state}, checkpoint_id=partial)
        except (Exception, CheckpointException) as e:  # DCP raises any rank's failure on every rank (a BaseException)
            return self._failed(step, e)
        return self._commit(step) and ok

    def wait(self) -> bool:
        """Block until an async save in flight is written and committed (call before exiting); False if it failed
        and `on_save_error` is "continue"."""
        if self._pending is None:
            return True
        fut, step = self._pending
        self._pending = None
        try:
            fut.result()
        except (Exception, CheckpointException) as e:
            return self._failed(step, e)
        return self._commit(step)

    def _failed(self, step: int, error: Exception) -> bool:
        """Remove the partial folder of a failed save; raise or (`on_save_error="continue"`) log and go on."""
        on_rank0(shutil.rmtree, self.path(step) + ".partial", True)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        message = (f"saving checkpoint {self.path(step)} failed ({type(error).__name__}: {first}); its partial folder "
                   f"was removed and the previous checkpoints {self.steps()} are intact")
        if self.on_save_error == "stop":
            raise CheckpointSaveError(message + "; free space or pass --on-save-error continue") from error
        log.warning("%s; training goes on without it", message)
        return False

    def _commit(self, step: int) -> bool:
        # dcp.save returns on every rank after every rank's data and the metadata are written; each rank digests
        # a share of the files, rank 0 writes the manifest and renames the folder.
        partial = self.path(step) + ".partial"
        try:
            mine = [(n, *_digest(os.path.join(partial, n))) for n in _my_share(_data_files(partial))]
        except OSError as e:  # gathered first: every rank must reach the collective
            mine = [(None, f"{type(e).__name__}: {e}", 0)]
        digests = _gather(mine)
        errors = [size for name, size, _ in digests if name is None]
        if errors:
            return self._failed(step, OSError(f"reading back the written files: {errors[0]}"))

        def commit():
            with open(os.path.join(partial, MANIFEST), "w") as f:
                json.dump({"step": step, "files": {n: {"size": size, "crc32": crc} for n, size, crc in digests}}, f)
            replace_dir(partial, self.path(step))
            older = [s for s in self.steps() if s < step]  # never a newer one, e.g. of an earlier run
            for old in older[: max(len(older) - (self.keep_last - 1), 0)]:
                shutil.rmtree(self.path(old), ignore_errors=True)
            log.info("checkpoint %s complete", self.path(step))

        try:
            on_rank0(commit)
        except RuntimeError as e:  # e.g. no space left for the manifest: every rank sees it
            return self._failed(step, e)
        return True

    def verify(self, step: int) -> list[str]:
        """What is wrong with the checkpoint of `step` (empty: it is whole); collective."""
        return _problems(self.path(step))

    def load_latest(self, state: TrainState, check=None) -> int | None:
        """Load the newest complete checkpoint that verifies into `state` (resharding as needed); its step, or None.
        A broken one is named with what is wrong and the previous one is tried. `check(path)` runs before loading
        (e.g. `check_compatible`: a checkpoint of another model is an error, not a fallback)."""
        steps = self.steps()
        for step in reversed(steps):
            path = self.path(step)
            problems = self.verify(step)
            if not problems:
                if check is not None:
                    check(path)
                self._load(path, state)
                return step
            self.skipped.append((path, problems))
            older = [s for s in steps if s < step]
            then = f"falling back to {self.path(older[-1])}" if older else "no older checkpoint: starting at step 1"
            log.warning("checkpoint %s is broken: %s; %s", path, "; ".join(problems[:3]), then)
        return None

    def _load(self, path: str, state: TrainState) -> None:
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        state.with_rng = any(k.startswith(f"train.{state._rng_key()}.") for k in saved)
        if not state.with_rng:
            log.warning("%s was written by another world size: RNG states are not restored", path)
        try:
            dcp.load({"train": state}, checkpoint_id=path)
        finally:
            state.with_rng = True
