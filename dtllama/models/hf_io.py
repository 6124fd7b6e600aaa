"""Hugging Face checkpoints through DCP's `HuggingFaceStorageReader` / `HuggingFaceStorageWriter`.

Parameter names are HF's, so the model's state dict is read and written with no key map. Before
anything is read, the safetensors headers are checked against the config, so a wrong or damaged
checkpoint is an error naming the file and tensor instead of a failure deep inside DCP. A saved
folder appears only once complete: it is written beside the target and renamed into place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import tempfile
import threading
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from dtllama.models.config import ModelConfig
from dtllama.models.blocks import copy_full_into, hf_name
from dtllama.models.moe import GroupedExperts, MoEBlock, balanced_blocks
from dtllama.fsutil import on_rank0, rank, replace_dir

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja",
)
_ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorEntry(NamedTuple):
    """Where a tensor lives: its file, shape, dtype and absolute byte range in that file."""

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    begin: int
    end: int


def read_safetensors_index(path: str) -> dict[str, TensorEntry]:
    """`{tensor name: TensorEntry}` from the headers of every `*.safetensors` in `path`.

    Checks that each file is complete (its size covers every tensor the header declares) and that
    every file named by `model.safetensors.index.json` exists.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
    out: dict[str, TensorEntry] = {}
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        for name, fname in weight_map.items():
            if not os.path.exists(os.path.join(path, fname)):
                raise FileNotFoundError(f"{index} maps {name!r} to {fname!r}, which is missing from {path!r}")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path!r}")
    for fname in files:
        full = os.path.join(path, fname)
        size = os.path.getsize(full)
        with open(full, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{full} is truncated ({size} bytes): not a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size:
                raise ValueError(f"{full} is truncated: header of {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if 8 + n + end > size:
                raise ValueError(f"{full} is truncated: tensor {name!r} ends at byte {8 + n + end}, file has {size}")
            out[name] = TensorEntry(full, tuple(info["shape"]), _ST_DTYPES.get(info["dtype"]), 8 + n + begin, 8 + n + end)
    return out


def load_pretrained(cls, path, dtype: torch.dtype | None = torch.float32):
    """Build `cls` on the meta device, materialize it on the host, and read the HF weights into it."""
    path = os.fspath(path)
    config = getattr(cls, "config_class", ModelConfig).from_hf(path)
    with torch.device("meta"):
        model = cls(config)
    model.to_empty(device="cpu")
    if dtype is not None:
        model.to(dtype)
    load_state_into(model, path)
    return model


def hf_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict less the training state HF has no field for (the MoE balancing bias: `moe.MoEBlock`):
    the tensors an HF checkpoint holds, routed experts still stacked."""
    state = {k: plain_tensor(v) for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, MoEBlock):
            state.pop(_state_prefix(name) + "expert_bias", None)
    return state


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` without a wrapper subclass around its data (torchao's float8 training weights wrap the parameter's
    tensor), a DTensor's local tensor unwrapped alike: what safetensors writes, on the same storage, so a load into
    it lands in the parameter."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        local = t.to_local()
        inner = plain_tensor(local)
        return t if inner is local else DTensor.from_local(inner, t.device_mesh, t.placements, run_check=False,
                                                           shape=t.shape, stride=t.stride())
    while type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()  # the data, and maybe more (a precomputed float8 scale)
        inner = next((getattr(t, n) for n in names if getattr(t, n).shape == t.shape), None)
        if inner is None:
            break
        t = inner
    return t


def _state_prefix(module_name: str) -> str:
    """The state-dict prefix of a module: its HF name (wrappers' prefixes dropped, as the state dict drops them)."""
    return hf_name(module_name) + "." if module_name else ""


def checkpoint_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict as its HF checkpoint files name and shape it (`hf_state`), with stacked experts a
    family's files hold one per expert as views of this rank's experts (`Qwen3MoeExperts`)."""
    state = hf_state(model)
    for name, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            module.checkpoint_tensors(_state_prefix(name), state)
    return state


@torch.no_grad()
def load_state_into(model, path: str) -> None:
    """Read an HF checkpoint into `model` (plain or DTensor parameters; each rank reads its slices)."""
    ckpt = read_safetensors_index(path)
    state = checkpoint_state(model)
    missing = []
    for name, t in state.items():
        if name not in ckpt:
            missing.append(name)
            continue
        fname, shape = ckpt[name].file, ckpt[name].shape
        if tuple(t.shape) != shape and name.startswith("score."):
            raise ValueError(
                f"{fname}: value head tensor {name!r} has shape {list(shape)} but LlamaForValue predicts one value "
                f"per token ({list(t.shape)}); use a num_labels=1 checkpoint, or a causal-LM one (the head is then "
                "initialized)"
            )
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{fname}: tensor {name!r} has shape {list(shape)} but the config gives {list(t.shape)}; "
                "the checkpoint and its config.json disagree"
            )
        dtype = ckpt[name].dtype
        if t.is_floating_point() and (dtype is None or not dtype.is_floating_point):
            raise ValueError(f"{fname}: tensor {name!r} is stored as {dtype or 'a dtype safetensors calls otherwise'}"
                             f", not floating point: it is not this model's weight (re-export the checkpoint)")
    heads = {n for n in missing if n.startswith("score.")}
    if set(missing) - heads and hasattr(model, "converted_state"):
        # Files in another layout than the modules' (transformers 5 converts some families' checkpoints at load,
        # e.g. one tensor per expert into stacked experts): the model's own library reads them.
        full = model.converted_state(path)
        for name, t in state.items():
            copy_full_into(t, full[name].to(t.dtype))
        model.reset_buffers()
        return
    if set(missing) - heads:
        raise ValueError(f"checkpoint {path!r} lacks {sorted(set(missing) - heads)}")
    _check_value_head(model, state, ckpt, heads, path)
    if heads:
        log.warning("checkpoint %s has no value head; initializing %s randomly", path, sorted(heads))
        model.init_weights(names=heads)
    wanted = {k: v for k, v in state.items() if k in ckpt}
    # One reader thread per file (up to 8): reads and host-to-device copies of different files overlap.
    threads = min(8, len({e.file for e in ckpt.values()}))
    dcp.load(wanted, storage_reader=PinnedHFReader(path, ckpt, thread_count=threads),
             no_dist=not dist.is_initialized())
    model.reset_buffers()
    for block in balanced_blocks(model):  # HF checkpoints hold no balancing bias: start from none
        block.reset_balance(bias=True)


def _check_value_head(model, state: dict, ckpt: dict, missing: set[str], path: str) -> None:
    """A value head is read whole or initialized whole, never half, and no bias of the checkpoint is dropped:
    `score.bias` exists in HF's `*ForTokenClassification` layout only, which `config.value_head` picks."""
    ours = {n for n in state if n.startswith("score.")}
    if not ours:
        return
    if missing and missing != ours:
        raise ValueError(
            f"checkpoint {path!r} has {sorted(ours - missing)} but lacks {sorted(missing)}, so its value head matches "
            f"neither HF layout the config allows (architectures={model.config.architectures}); fix config.json's "
            "architectures (or token_classification_bias) to match the checkpoint's head"
        )
    if "score.bias" in ckpt and "score.bias" not in ours:
        token = model.config.hf_prefix + "ForTokenClassification"
        raise ValueError(
            f"checkpoint {path!r} has 'score.bias' (HF *ForTokenClassification layout) but the model's value head "
            f"has no bias (config architectures={model.config.architectures}); build the model from "
            f"ModelConfig.from_hf(path), or set the config's architectures to [{token!r}]"
        )


class PinnedHFReader(HuggingFaceStorageReader):
    """DCP's `HuggingFaceStorageReader` with a faster path for GPU targets.

    A slice that is a contiguous byte range of its file (every row-wise shard: FSDP's `Shard(0)`, a
    vocab shard, a whole tensor) is read with `preadv` straight into a pinned host buffer and copied
    to the GPU asynchronously on the reader thread's own stream, then cast there. The stock path
    (safetensors slice -> pageable CPU tensor -> synchronous copy) serves the rest: CPU targets and
    column shards. Each reader thread (up to 8) cycles two pinned buffers of `piece_bytes` (64 MiB), so
    host memory stays at most 1 GiB whatever the model size.
    """

    def __init__(self, path: str, entries: dict[str, TensorEntry], thread_count: int = 1,
                 piece_bytes: int = 64 * 2**20):
        super().__init__(path, thread_count=thread_count)
        self.entries = entries
        self.piece_bytes = piece_bytes

    def _process_read_request(self, f, req, planner) -> None:
        entry = self.entries.get(req.storage_index.fqn)
        target = planner.resolve_tensor(req).detach()
        offsets, lengths = req.storage_offsets, req.lengths
        fast = (entry is not None and entry.dtype is not None and len(lengths) >= 1 and target.is_cuda
                and target.is_contiguous()
                and all(o == 0 and n == s for o, n, s in zip(offsets[1:], lengths[1:], entry.shape[1:])))
        if not fast:
            return super()._process_read_request(f, req, planner)
        row = entry.dtype.itemsize * math.prod(entry.shape[1:])
        rows_per_piece = max(1, self.piece_bytes // max(row, 1))
        start = entry.begin + offsets[0] * row
        for r in range(0, lengths[0], rows_per_piece):
            n = min(rows_per_piece, lengths[0] - r)
            buf = self._buffer(target.device)
            _pread_into(self._fds[entry.file], buf.tensor[: n * row].numpy(), start + r * row, entry.file)
            with torch.cuda.stream(self._local.stream):
                src = buf.tensor[: n * row].view(entry.dtype).view(n, *target.shape[1:])
                if src.dtype != target.dtype:
                    src = src.to(target.device, non_blocking=True)  # cast on the GPU, not on the host
                target.narrow(0, r, n).copy_(src, non_blocking=True)
                buf.done.record()
        # The default planner's commit does nothing with `target`; the copies land before read_data returns.
        planner.commit_tensor(req, target)

    def _buffer(self, device):
        """The next of this thread's two pinned buffers, once the copy out of it has finished."""
        local = self._local
        if not hasattr(local, "buffers"):
            with torch.cuda.device(device):  # a new thread starts on device 0, whatever the target's device
                local.stream = torch.cuda.Stream()
                # After whatever the caller queued on the targets (allocation, casts): the default stream.
                local.stream.wait_stream(torch.cuda.default_stream())
                local.buffers = [_Pinned(self.piece_bytes) for _ in range(2)]
            local.turn = 0
            with self._lock:
                self._streams.append(local.stream)
        local.turn ^= 1
        buf = local.buffers[local.turn]
        buf.done.synchronize()
        return buf

    def read_data(self, plan, planner):
        self._fds = {f: os.open(f, os.O_RDONLY) for f in {e.file for e in self.entries.values()}}
        self._local, self._streams, self._lock = threading.local(), [], threading.Lock()
        try:
            fut = super().read_data(plan, planner)
            for stream in self._streams:
                stream.synchronize()  # every reader's copies have landed
        finally:
            for fd in self._fds.values():
                os.close(fd)
        return fut


def _pread_into(fd: int, out, offset: int, name: str) -> None:
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise ValueError(f"{name}: unexpected end of file at byte {offset + done}")
        done += n


class _Pinned:
    def __init__(self, nbytes: int):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.done = torch.cuda.Event()
        self.done.record()


def _shard_index(model, dtype: torch.dtype, max_shard_bytes: int) -> dict[str, int]:
    """File number (1..N) of each tensor of the whole model, filling files up to `max_shard_bytes` in state-dict
    order. Taken from a meta-device copy built from the config, so that every rank computes the same index even
    when it holds only some layers (a pipeline stage)."""
    from torch.distributed.fsdp import FSDPModule

    # The model's own class: fully_shard swaps in a subclass of FSDPModule and it.
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        whole = cls(model.config)
    index, used, shard = {}, 0, 1
    for name, t in checkpoint_state(whole).items():
        nbytes = t.numel() * dtype.itemsize
        if used and used + nbytes > max_shard_bytes:
            shard, used = shard + 1, 0
        index[name] = shard
        used += nbytes
    return index


def save_pretrained(model, path, dtype: torch.dtype | None = None, max_shard_bytes: int = 2**31,
                    source: str | None = None) -> None:
    """Write `model` (any layout) as an HF folder: sharded safetensors + index, `config.json`, and the
    tokenizer files of `source`.

    Under a process group every rank writes its own slices and rank 0 consolidates them
    (`HuggingFaceStorageWriter(save_distributed=True, enable_consolidation=True)`): no rank gathers
    the whole model. The folder appears only once complete.
    """
    path = os.fspath(path)
    distributed = dist.is_initialized()
    state = {k: (v.to(dtype) if dtype is not None else v) for k, v in checkpoint_state(model).items()}
    parent = os.path.dirname(os.path.abspath(path))

    def make_tmp():
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)

    def finish():
        shutil.rmtree(os.path.join(tmp, "sharded"), ignore_errors=True)
        dtypes = {t.dtype for t in state.values()}
        _write_metadata(tmp, model.config, model.hf_architecture, dtypes.pop() if len(dtypes) == 1 else None, source)
        replace_dir(tmp, path)

    tmp = on_rank0(make_tmp)
    try:
        index = _shard_index(model, next(iter(state.values())).dtype, max_shard_bytes)
        writer = HuggingFaceStorageWriter(tmp, fqn_to_index_mapping=index,
                                          save_distributed=distributed, enable_consolidation=distributed)
        dcp.save(state, storage_writer=writer, no_dist=not distributed)
        on_rank0(finish)
    except BaseException:
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_metadata(folder: str, config: ModelConfig, architecture: str, dtype: torch.dtype | None,
                    source: str | None) -> None:
    cfg = config.to_hf(architecture)
    if dtype is not None:
        cfg["dtype"] = cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    if architecture in ("ForSequenceClassification", "ForTokenClassification"):
        cfg.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if source is not None:
        for fname in TOKENIZER_FILES:
            if os.path.exists(os.path.join(source, fname)):
                shutil.copy(os.path.join(source, fname), folder)
