"""What each rank runs for the weight-streaming tests (`test_weights.py`): stream a parallelized model's weights,
compare each tensor bitwise with the HF files of the same model saved from one process, and measure the memory the
stream holds."""

from __future__ import annotations

import ctypes
import gc

import torch
from parallel_cases import model_config, parallel_model
from pp_cases import build_pipeline
from safetensors.torch import load_file

from dtllama.models.hf_io import read_safetensors_index
from dtllama.train.weights import stream_weights


def _model(config_dict: dict, layout: dict, seed: int, pp_options):
    if layout.get("pp", 1) > 1:
        pipe, dims = build_pipeline(config_dict, layout, False, pp_options, seed)
        return pipe.model, dims
    return parallel_model(model_config(config_dict), layout, seed)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


def heap_in_use() -> int | None:
    """Bytes this process holds from malloc right now (glibc's `mallinfo2`: in-use arena chunks + mmapped blocks),
    which is where torch's CPU tensors live; None without glibc 2.33+."""
    try:
        f = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None
    f.restype = _MallInfo2
    m = f()
    return m.uordblks + m.hblkhd


def stream_rank(config_dict: dict, layout: dict, seed: int, reference: str, bucket_bytes: int, to: str = "all",
                pp_options=None) -> dict:
    """On every rank: the streamed names in order, whether each tensor equals the reference files' bitwise, each
    bucket's bytes, the peak bytes the stream allocated, this rank's shard bytes and the largest full tensor."""
    model, dims = _model(config_dict, layout, seed, pp_options)
    files = sorted({e.file for e in read_safetensors_index(reference).values()})
    ref = {k: v for f in files for k, v in load_file(f).items()}
    names, mismatched, sizes, held = [], [], [], []
    for bucket in stream_weights(model, dims, bucket_bytes=bucket_bytes, to=to):
        sizes.append(sum(t.numel() * t.element_size() for _, t in bucket))
        for name, t in bucket:
            names.append(name)
            if name not in ref or t.shape != ref[name].shape or not torch.equal(t, ref[name]):
                mismatched.append(name)
        del bucket
    # Memory in a second stream, as a trainer streams after every update (the first one's collectives set up their
    # groups' state once): what this rank holds beyond its shards while the consumer has each bucket.
    gc.collect()
    base = heap_in_use()
    for bucket in stream_weights(model, dims, bucket_bytes=bucket_bytes, to=to):
        if base is not None:
            held.append(heap_in_use() - base)
        del bucket
    shards = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                 for p in model.state_dict().values())
    return {"names": names, "mismatched": mismatched, "bucket_bytes": sizes, "held": held,
            "shard_bytes": shards, "largest": max(v.numel() * v.element_size() for v in ref.values()),
            "reference": sorted(ref)}
