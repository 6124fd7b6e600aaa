"""Convert between Hugging Face folders and DCP checkpoints.

    python -m dtllama.models.convert hf-to-dcp SRC_HF_FOLDER DST_DCP_FOLDER
    python -m dtllama.models.convert dcp-to-hf SRC_DCP_FOLDER DST_HF_FOLDER [--dtype bfloat16]

`dcp-to-hf` reads the folders `hf-to-dcp` writes (model state dict + config.json); a training
checkpoint (`step-N`, whose model sits under `train.model.`) is exported by the recipe's --export-hf.

A DCP folder holds the model's state dict (HF names) plus the `config.json` it came with. Either
direction checks the source before anything is written, writes beside the destination and renames
into place, so a failed conversion leaves nothing behind. Runs in one process (not under a process
group); the model is held once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner

from dtllama.models.config import ModelConfig
from dtllama.fsutil import staged_dir
from dtllama.models.hf_io import load_pretrained
from dtllama.models.llama import LlamaForCausalLM, LlamaForValue

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Progress:
    """A one-line progress bar over bytes, on stderr."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self.t0 = label, max(total, 1), 0, time.perf_counter()

    def add(self, nbytes: int) -> None:
        before = int(100 * self.done / self.total)
        self.done += nbytes
        if int(100 * self.done / self.total) != before:  # redraw once per percent
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {100 * frac:5.1f}% {self.done / 2**30:.2f}/"
                             f"{self.total / 2**30:.2f} GiB {time.perf_counter() - self.t0:.1f}s")
            if frac >= 1.0:
                sys.stderr.write("\n")
            sys.stderr.flush()


class _ProgressLoadPlanner(DefaultLoadPlanner):
    def __init__(self, progress: _Progress):
        super().__init__()
        self.progress = progress

    def commit_tensor(self, read_item, tensor):
        super().commit_tensor(read_item, tensor)
        self.progress.add(tensor.numel() * tensor.element_size())


class _ProgressSavePlanner(DefaultSavePlanner):
    def __init__(self, progress: _Progress):
        super().__init__()
        self.progress = progress

    def resolve_data(self, write_item):
        data = super().resolve_data(write_item)
        if isinstance(data, torch.Tensor):
            self.progress.add(data.numel() * data.element_size())
        return data


def _model_class(config_json: dict):
    archs = config_json.get("architectures") or []
    return LlamaForValue if any(a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in archs) \
        else LlamaForCausalLM


def _nbytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _one_process() -> None:
    if dist.is_initialized():
        raise RuntimeError("dtllama.models.convert runs in one process; call it outside torchrun / a process group "
                           "(load_state_into and save_pretrained read and write HF folders from any layout)")


def hf_to_dcp(src: str, dst: str, dtype: torch.dtype | None = None) -> None:
    _one_process()
    with open(os.path.join(src, "config.json")) as f:
        raw = json.load(f)
    dtype = dtype or getattr(torch, ModelConfig.from_hf(raw).torch_dtype)
    model = load_pretrained(_model_class(raw), src, dtype=dtype)  # validates shapes, files, truncation first
    with staged_dir(dst) as tmp:
        dcp.save(model.state_dict(), checkpoint_id=tmp, no_dist=True,
                 planner=_ProgressSavePlanner(_Progress("writing DCP", _nbytes(model))))
        shutil.copy(os.path.join(src, "config.json"), tmp)


def dcp_to_hf(src: str, dst: str, dtype: torch.dtype | None = None) -> None:
    _one_process()
    cfg_path = os.path.join(src, "config.json")
    if not os.path.exists(cfg_path) or not os.path.exists(os.path.join(src, ".metadata")):
        raise FileNotFoundError(f"{src!r} is not a dtllama DCP folder (needs .metadata and config.json)")
    with open(cfg_path) as f:
        raw = json.load(f)
    config = ModelConfig.from_hf(raw)
    with torch.device("meta"):
        model = _model_class(raw)(config)
    model.to_empty(device="cpu")
    # Checked here, before DCP plans the read, for an error naming the folder and the tensor.
    saved = dcp.FileSystemReader(src).read_metadata().state_dict_metadata
    for name, t in model.state_dict().items():
        if name not in saved:
            raise ValueError(f"{src}: tensor {name!r} is missing from the checkpoint")
        if tuple(saved[name].size) != tuple(t.shape):
            raise ValueError(f"{src}: tensor {name!r} has shape {list(saved[name].size)}, config gives {list(t.shape)}")
    dcp.load(model.state_dict(), checkpoint_id=src, no_dist=True,
             planner=_ProgressLoadPlanner(_Progress("reading DCP", _nbytes(model))))
    model.reset_buffers()
    model.save_pretrained(dst, dtype=dtype or getattr(torch, config.torch_dtype))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=["hf-to-dcp", "dcp-to-hf"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=list(DTYPES), help="dtype to store (default: the config's torch_dtype)")
    args = p.parse_args(argv)
    fn = hf_to_dcp if args.direction == "hf-to-dcp" else dcp_to_hf
    fn(args.src, args.dst, DTYPES[args.dtype] if args.dtype else None)
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    main()
