"""What each rank of a worker pool runs for the parallel property tests, and the single-device reference.

A case: a config, a layout, a packed batch of sequences and a seed. Every data-parallel rank takes
its share of the sequences; the objective is a token-weighted sum normalized by the global token
count, so gradients are those of the whole batch on one device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import dtllama
from dtllama.model import hf_name
from dtllama.ops import IGNORE_INDEX, cu_seqlens_from_lengths, pad_to_multiple
from dtllama.parallel import CompileOptions, ParallelDims, clip_grad_norm_, parallelize

ENTROPY_WEIGHT = 0.01
LR = 1e-2
_DIMS: dict = {}


def build(config: dtllama.ModelConfig, value: bool):
    cls = dtllama.LlamaForValue if value else dtllama.LlamaForCausalLM
    return cls(config)


def objective(model, seqs, labels_list, value: bool, n_global: int, dp: int, multiple: int = 1):
    """Forward the packed `seqs`; returns (loss scaled for FSDP's mean over dp, per-sequence outputs)."""
    lengths = [len(s) for s in seqs]
    ids = torch.cat(seqs)
    labels = torch.cat(labels_list)
    p = pad_to_multiple(ids, cu_seqlens_from_lengths(lengths), multiple, labels)
    T = ids.numel()
    if value:
        v = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen).values
        # Linear in the values, with per-token weights from the labels: a squared value would scale every
        # gradient by the value itself, which can cancel to 1/50 of its terms and amplify fp32 rounding
        # past the tolerance (a CI draw: 1.03e-5 on a gate_proj gradient, tp=2).
        weights = torch.where(labels != IGNORE_INDEX, 1.0 + labels.remainder(5) / 5.0, 0.0)
        loss = (v[:T] * weights).sum()
        outs = {"values": v[:T]}
    else:
        out = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=p.labels)
        loss = -(out.logprobs.sum() + ENTROPY_WEIGHT * out.entropy.sum())
        with torch.no_grad():
            logits = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen).logits[:T]
        outs = {"logprobs": out.logprobs[:T], "entropy": out.entropy[:T], "logits": logits}
    split = {k: list(v.detach().split(lengths)) for k, v in outs.items()}
    return loss / n_global * dp, split


def step(model, loss):
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[hf_name(n)] = g.detach().clone()
    norm = clip_grad_norm_(model.parameters(), max_norm=1e9)  # only measures: nothing is clipped
    # Adam's first step is lr * g / (|g| + eps): a gradient rounding error dg moves a parameter by up
    # to lr * dg / eps. fp32 gradients of different summation orders differ by ~1e-8 here, so eps=1e-3
    # keeps that below 1e-7 * lr, far inside the 1e-5 tolerance, while real gradients still dominate.
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-3, weight_decay=0.1, foreach=False)
    opt.step()
    params = {}
    for n, p in model.named_parameters():
        params[hf_name(n)] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    return grads, params, float(norm)


def reference(config_dict: dict, seqs, labels_list, seed: int, value: bool):
    config = dtllama.ModelConfig(**config_dict)
    model = build(config, value)
    model.init_weights(seed)
    n_global = sum(int((lab != IGNORE_INDEX).sum()) for lab in labels_list)
    loss, outs = objective(model, seqs, labels_list, value, max(n_global, 1), 1)
    grads, params, norm = step(model, loss)
    return outs, grads, params, norm


def placements(model) -> dict[str, tuple]:
    out = {}
    for n, p in model.named_parameters():
        if isinstance(p, DTensor):
            out[hf_name(n)] = (tuple(p.device_mesh.mesh_dim_names), tuple(str(x) for x in p.placements))
        else:
            out[hf_name(n)] = None
    return out


def run_rank(config_dict: dict, layout: dict, seqs, labels_list, seed: int, value: bool, ac: str = "none",
             compile_backend: str | None = None):
    """On every rank: parallelize a meta-device model, init, forward/backward/AdamW on this rank's share.

    `compile_backend`: compile each block with it (the pool's dynamo caches are reset first: every
    example is a new model, and a full recompile cache would silently fall back to eager)."""
    config = dtllama.ModelConfig(**config_dict)
    ParallelDims(**layout).resolve(dist.get_world_size(), config)  # validates against this config
    key = tuple(sorted(layout.items()))
    if key not in _DIMS:  # process groups are created once per layout and reused across examples
        _DIMS[key] = ParallelDims(**layout).resolve(dist.get_world_size())
        _DIMS[key].build_mesh("cpu")
    dims = _DIMS[key]
    with torch.device("meta"):
        model = build(config, value)
    compile = False
    if compile_backend is not None:
        torch._dynamo.reset()
        compile = CompileOptions(backend=compile_backend)
    parallelize(model, dims, ac=ac, compile=compile)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    place = placements(model)  # before forward: FSDP keeps some groups unsharded after it
    dp_rank, dp = dims.mesh("dp").get_local_rank(), dims.mesh("dp").size()
    mine = list(range(dp_rank, len(seqs), dp))
    n_global = sum(int((lab != IGNORE_INDEX).sum()) for lab in labels_list)
    loss, outs = objective(model, [seqs[i] for i in mine], [labels_list[i] for i in mine], value,
                           max(n_global, 1), dp, dims.token_multiple)
    grads, params, norm = step(model, loss)
    return {"indices": mine, "outs": outs, "grads": grads, "params": params, "norm": norm, "placements": place}


def validate_rank(config_dict: dict, layout: dict) -> str | None:
    """On every rank: validate a layout as `run_rank` does first; return the error message, if any."""
    try:
        ParallelDims(**layout).resolve(dist.get_world_size(), dtllama.ModelConfig(**config_dict))
    except ValueError as e:
        return str(e)
    return None
