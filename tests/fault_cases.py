"""Pool tasks of the fault and option tests (light: torch and dtllama only, as pool workers import it)."""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

import dtllama
from dtllama.models.llama import hf_name
from dtllama.ops import cu_seqlens_from_lengths, pad_to_multiple, shift_labels
from dtllama.parallel import CompileOptions, FSDPOptions, ParallelDims, parallelize

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, initializer_range=0.2)
_DIMS: dict = {}


def _dims(layout: dict) -> ParallelDims:
    key = tuple(sorted(layout.items()))
    if key not in _DIMS:  # process groups are created once per layout and reused across tests
        _DIMS[key] = ParallelDims(**layout).resolve(dist.get_world_size(), dtllama.ModelConfig(**CONFIG))
        _DIMS[key].build_mesh("cpu")
    return _DIMS[key]


def _model(layout: dict, seed: int, dtype: torch.dtype | None = None, **options):
    """The model of CONFIG, parallelized with `options`, its parameters (not the RoPE buffer) in `dtype`."""
    dims = _dims(layout)
    with torch.device("meta"):
        model = dtllama.LlamaForCausalLM(dtllama.ModelConfig(**CONFIG))
    if dtype is not None:
        for q in model.parameters():
            q.data = q.data.to(dtype)
    parallelize(model, dims, **options)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model, dims


def batch(seed: int, lengths: list[int], multiple: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CONFIG["vocab_size"], (sum(lengths),), generator=g)
    cu = cu_seqlens_from_lengths(lengths)
    return pad_to_multiple(ids, cu, multiple, shift_labels(ids, cu))


def spoil(p, fault: str):
    """The packed batch `p` made invalid in one of the ways a data pipeline gets it wrong."""
    if fault == "label":
        p.labels[1] = CONFIG["vocab_size"] + 7
    elif fault == "cu_seqlens":
        p.cu_seqlens = p.cu_seqlens.clone()
        p.cu_seqlens[-1] -= 1  # no longer ends at T
    elif fault == "max_seqlen":
        p.max_seqlen = 1
    return p


def run_bad_batch(layout: dict, fault: str, bad_rank: int, seed: int):
    """Every rank steps; `bad_rank` alone gets a spoiled batch. Returns (error message or None, seconds)."""
    model, dims = _model(layout, seed)
    p = batch(seed + dist.get_rank(), [5, 9, 3], dims.token_multiple)
    if dist.get_rank() == bad_rank:
        p = spoil(p, fault)
    t0 = time.perf_counter()
    try:
        out = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=p.labels)
        out.logprobs.sum().backward()
    except ValueError as e:
        return str(e), time.perf_counter() - t0
    return None, time.perf_counter() - t0


def _full(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of the whole tensor (gathered if a DTensor)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def grads_of(model, p) -> dict[str, torch.Tensor]:
    out = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=p.labels)
    (-(out.logprobs.sum() + 0.01 * out.entropy.sum())).backward()
    return {hf_name(n): _full(q.grad) for n, q in model.named_parameters()}


def run_options(layout: dict, seed: int, fsdp: dict | None = None, backend: str | None = None):
    """Gradients of one batch (the same on every rank) under the given FSDP / compile options.

    Also reports whether layer 0's parameters were left unsharded after forward (reshard_after_forward).
    """
    options = {"fsdp": FSDPOptions(**fsdp) if fsdp is not None else None}
    if backend is not None:
        options["compile"] = CompileOptions(backend=backend)
    model, dims = _model(layout, seed, **options)
    p = batch(seed, [6, 11, 4], dims.token_multiple)
    out = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=p.labels)
    layer0 = model.model.layers["0"]
    unsharded_after_forward = not isinstance(layer0.mlp.up_proj.weight, DTensor)
    (-(out.logprobs.sum() + 0.01 * out.entropy.sum())).backward()
    grads = {hf_name(n): _full(q.grad) for n, q in model.named_parameters()}
    return {"grads": grads, "unsharded_after_forward": unsharded_after_forward}


def run_mixed_precision(seed: int, backend: str | None = None, ac: str = "none", layout: dict | None = None):
    """A layout without data parallelism (one rank by default, or TP alone), `param_dtype=bf16`: the model as
    `parallelize` leaves it (fp32 parameters, casts at use) and a reference of the same layout holding bf16
    parameters, on one batch. Returns their outputs and gradients (whole), and the parameters' dtypes and
    types as parallelized, and whether FSDP wraps it."""
    layout = layout or dict(dp_shard=1)
    options = dict(fsdp=FSDPOptions(param_dtype=torch.bfloat16), ac=ac)
    if backend is not None:
        options["compile"] = CompileOptions(backend=backend)
    model, dims = _model(layout, seed, **options)
    ref, _ = _model(layout, seed, torch.bfloat16, ac=ac, **({"compile": options["compile"]} if backend else {}))
    p = batch(seed, [6, 11, 4], dims.token_multiple)
    res = {"dtypes": {q.dtype for q in model.parameters()},
           "types": {type(q).__name__ for q in model.parameters()},
           "fsdp": any(isinstance(m, FSDPModule) for m in model.modules())}
    for name, m in (("mp", model), ("ref", ref)):
        out = m(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=p.labels)
        (-(out.logprobs.sum() + 0.01 * out.entropy.sum())).backward()
        res[name] = {"logprobs": _full(out.logprobs), "entropy": _full(out.entropy),
                     "grads": {hf_name(n): _full(q.grad) for n, q in m.named_parameters()}}
    return res


def run_bad_cp_batch(fault: str | None, bad_ranks: list[int], seed: int):
    """cp=2: the ranks in `bad_ranks` pass a batch CP cannot split (`padded`: a [B, S] batch; `unpadded`: a
    packed T that is not a multiple of cp), the others a good one. Returns (error message or None, seconds)."""
    model, dims = _model(dict(cp=2, dp_shard=1), seed)
    bad = dist.get_rank() in bad_ranks
    p = batch(seed, [5, 1, 7], 1 if bad and fault == "unpadded" else dims.token_multiple)  # 13 tokens, or 14
    args, kwargs = (p.input_ids,), dict(position_ids=p.position_ids, cu_seqlens=p.cu_seqlens, max_seqlen=p.max_seqlen,
                                        labels=p.labels)
    if bad and fault == "padded":
        ids = torch.randint(0, CONFIG["vocab_size"], (3, 6))
        args, kwargs = (ids,), dict(attention_mask=torch.ones_like(ids), labels=ids)
    t0 = time.perf_counter()
    try:
        out = model(*args, **kwargs)
        out.logprobs.sum().backward()
    except ValueError as e:
        return str(e), time.perf_counter() - t0
    return None, time.perf_counter() - t0


class _CountAllToAll(TorchDispatchMode):
    """Counts the all-to-alls that run under it (as the dispatcher sees them: also inside checkpoint recompute)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops._c10d_functional.all_to_all_single.default
        return func(*args, **(kwargs or {}))


def backward_all_to_alls(ac: str, seed: int) -> int:
    """cp=2: how many all-to-alls one backward runs under activation checkpointing `ac`."""
    model, dims = _model(dict(cp=2, dp_shard=1), seed, ac=ac)
    p = batch(seed, [9, 4, 1], dims.token_multiple)
    out = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=p.labels)
    with _CountAllToAll() as count:
        out.logprobs.sum().backward()
    return count.n


def abort_rank0(marker: str | None, rank1_raises: bool = False) -> int:
    """Rank 0 aborts (SIGABRT, as a C++ `std::terminate` would) unless `marker` exists; it creates the marker
    first, so with a path the first call aborts and the second succeeds. With None it aborts every time.
    `rank1_raises`: rank 1 raises an error of its own meanwhile."""
    rank = dist.get_rank()
    if rank == 1 and rank1_raises:
        raise ValueError("rank 1 fails on purpose")
    if rank == 0 and (marker is None or not os.path.exists(marker)):
        if marker is not None:
            open(marker, "w").close()
        print("rank 0 aborts on purpose", file=sys.stderr, flush=True)
        os.abort()
    return rank


def hang_on_rank1(seconds: float) -> int:
    """Rank 1 sleeps `seconds` (a hung task, for the pool's timeout); rank 0 returns at once."""
    if dist.get_rank() == 1:
        time.sleep(seconds)
    return dist.get_rank()


# ------------------------------------------------------------------------------------ broken and failed checkpoints


def _full_params(model) -> dict:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _saved_steps(folder: str, steps: int, **checkpointer):
    """An FSDP model over every rank whose parameters move by `step` before each of `steps` checkpoints; returns
    `(model, optimizer, checkpointer, full parameters at each step)`."""
    from dtllama.train.checkpoint import Checkpointer, TrainState

    model, _ = _model({"dp_shard": -1}, 0)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(folder, **{"keep_last": steps, **checkpointer})
    snapshots = {}
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * step)
        snapshots[step] = _full_params(model)
        ckpt.save(step, TrainState(model, opt, extra={"step": step}))
    return model, opt, ckpt, snapshots


def _break(path: str, how: str) -> str:
    """Damage the checkpoint folder `path` as `how` says; the file it damaged."""
    data = sorted(n for n in os.listdir(path) if n.endswith(".distcp"))
    name = ".metadata" if how == "metadata" else data[-1]
    file = os.path.join(path, name)
    if how == "delete":
        os.remove(file)
    elif how == "truncate":
        os.truncate(file, os.path.getsize(file) // 2)
    elif how == "flip":  # the same size, one byte changed: only the manifest's CRC32 can tell
        with open(file, "r+b") as f:
            f.seek(os.path.getsize(file) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif how == "metadata":
        with open(file, "wb") as f:
            f.write(b"not a pickle")
    return name


def broken_checkpoint_rank(folder: str, how: str):
    """Three checkpoints, the newest damaged by `how` on rank 0: `load_latest` names the damage, loads the second
    (parameters equal to step 2's) and reports what it skipped."""
    from dtllama.train.checkpoint import TrainState

    folder = os.path.join(folder, how)
    model, opt, ckpt, snapshots = _saved_steps(folder, 3)
    damaged = _break(ckpt.path(3), how) if dist.get_rank() == 0 else None
    dist.barrier()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)
    state = TrainState(model, opt, extra={"step": 0})  # DCP loads into the keys it is given
    found = ckpt.load_latest(state)
    same = all(torch.equal(_full_params(model)[n], snapshots[2][n]) for n in snapshots[2])
    return found, state.extra.get("step"), same, ckpt.skipped, damaged


def full_disk_rank(folder: str, on_save_error: str):
    """Step 1 saved; the save of step 2 fails on rank 1 (its files may grow no larger than 1 KiB: RLIMIT_FSIZE, the
    kernel's own "file too large"); then step 3 saves normally. Returns what save(2) returned or raised, the folder's
    entries after it, and whether step 1 still verifies and the step 3 checkpoint is whole."""
    import resource
    import signal
    import warnings

    from dtllama.train.checkpoint import CheckpointSaveError, TrainState

    folder = os.path.join(folder, on_save_error)
    model, opt, ckpt, _ = _saved_steps(folder, 1, on_save_error=on_save_error, keep_last=3)
    state = TrainState(model, opt, extra={"step": 2})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    result, error = None, None
    try:
        if dist.get_rank() == 1:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = ckpt.save(2, state)
    except CheckpointSaveError as e:
        error = str(e)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    after_failure = sorted(os.listdir(folder))
    step1_whole = ckpt.verify(1) == []
    saved3 = ckpt.save(3, TrainState(model, opt, extra={"step": 3})) if error is None else None
    return result, error, after_failure, step1_whole, saved3, ckpt.steps()
