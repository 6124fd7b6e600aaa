"""What each rank of a worker pool runs for the pipeline tests: the property tests' objective, through a schedule.

The objective, the optimizer step and the reference are `parallel_cases`' (the single-device fp32 model):
the loss of each microbatch is taken on the last stage, gradients add up over microbatches, and every rank
returns the gradients and stepped parameters of its own part of the model, which the test joins.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

import dtllama
from dtllama.models.llama import hf_name
from dtllama.ops import IGNORE_INDEX, Packed, cu_seqlens_from_lengths, position_ids_from_cu_seqlens
from dtllama.parallel import FSDPOptions, ParallelDims
from dtllama.parallel.pp import PipelineOptions, pipeline_llm
from parallel_cases import ENTROPY_WEIGHT, build, cp_shard, model_config, placements, step

_DIMS: dict = {}


def dims_for(layout: dict) -> ParallelDims:
    key = tuple(sorted(layout.items()))
    if key not in _DIMS:  # process groups are created once per layout and reused across cases
        _DIMS[key] = ParallelDims(**layout).resolve(dist.get_world_size())
        _DIMS[key].build_mesh("cpu")
    return _DIMS[key]


def packed(seqs, labels) -> Packed:
    cu = cu_seqlens_from_lengths([len(s) for s in seqs])
    ids = torch.cat(seqs)
    return Packed(ids, position_ids_from_cu_seqlens(cu, ids.numel()), cu, max(len(s) for s in seqs), None,
                  torch.cat(labels))


def build_pipeline(config_dict: dict, layout: dict, value: bool, options: PipelineOptions, seed: int, ac="none"):
    config = model_config(config_dict)
    dims = dims_for(layout)
    with torch.device("meta"):
        model = build(config, value)
    pipe = pipeline_llm(model, dims, options, "cpu", ac=ac)
    pipe.to_empty("cpu")
    pipe.model.init_weights(seed)
    return pipe, dims


def run_pp_rank(config_dict: dict, layout: dict, seqs, labels_list, seed: int, value: bool, options: PipelineOptions,
                ac: str = "none"):
    """On every rank: a pipelined model, one schedule step of the property tests' objective on this rank's share
    of the sequences, the gradients, the gradient norm over all stages, one AdamW step."""
    pipe, dims = build_pipeline(config_dict, layout, value, options, seed, ac)
    place = placements(pipe.model)
    batch_rank, n_batch = dims.mesh("batch").get_local_rank(), dims.mesh("batch").size()
    mine = list(range(batch_rank, len(seqs), n_batch))
    n_global = max(sum(int((lab != IGNORE_INDEX).sum()) for lab in labels_list), 1)
    scale = dims.mesh("dp").size() / n_global
    mbs = pipe.split(packed([seqs[i] for i in mine], [labels_list[i] for i in mine]))
    cp_mesh = dims.mesh("cp") if dims.cp_enabled else None

    def loss_fn(out, i):
        if value:
            labels = cp_shard(mbs.packed[i].labels, cp_mesh)
            weights = torch.where(labels != IGNORE_INDEX, 1.0 + labels.remainder(5) / 5.0, 0.0)
            return (out * weights).sum() * scale
        lp, ent = out
        return -(lp.sum() + ENTROPY_WEIGHT * ent.sum()) * scale

    result = pipe.step(mbs, loss_fn)
    outs = result[0] if result else None
    grads, params, norm = step(pipe.model, None, pp_mesh=dims.mesh("pp"))
    merged = None
    if outs is not None and cp_mesh is None:
        lengths = [len(seqs[i]) for i in mine]
        names = ["values"] if value else ["logprobs", "entropy"]
        cols = [outs] if value else list(zip(*outs))
        merged = {n: list(mbs.merge(list(c)).split(lengths)) for n, c in zip(names, cols)}
    return {"indices": mine, "outs": merged, "grads": grads, "params": params, "norm": norm, "placements": place,
            "stage_layers": sorted({int(n.split(".")[2]) for n in grads if n.startswith("model.layers.")})}


def pp_error(config_dict: dict, seqs, labels_list, seed: int) -> str | None:
    """On every rank: split a batch whose sequence on rank 1 exceeds a microbatch; the error each rank raised."""
    pipe, dims = build_pipeline(config_dict, dict(pp=2), False, PipelineOptions("1F1B", 4, 16), seed)
    if dims.mesh("pp").get_local_rank() == 1:
        seqs = [torch.cat([seqs[0]] * 3)]
        labels_list = [torch.cat([labels_list[0]] * 3)]
    try:
        pipe.split(packed(seqs, labels_list))
    except ValueError as e:
        return str(e)
    return None


def pp_logits(config_dict: dict, layout: dict, seqs, labels_list, seed: int, options: PipelineOptions):
    """On every rank: a causal LM's pipeline without labels (sampling's forward): the last stage's full-vocab
    logits of every sequence, merged to the batch's order; then with labels, its log-probs (each schedule on the
    same stages). None on ranks without the last stage."""
    pipe, dims = build_pipeline(config_dict, layout, False, options, seed)
    with_labels = packed(seqs, labels_list)
    mbs = pipe.split(dataclasses.replace(with_labels, labels=None))
    logits = pipe.forward(mbs)
    logprobs = pipe.forward(pipe.split(with_labels))
    if logits is None:
        return None
    return mbs.merge(logits), mbs.merge([lp for lp, _ in logprobs])


def run_pp_mixed_precision(config_dict: dict, seqs, labels_list, seed: int, options: PipelineOptions):
    """On every rank of pp=2 (no data parallelism): one schedule step with `param_dtype=bf16` (fp32 parameters,
    casts at use) and with a reference pipeline holding bf16 parameters. Each one's last-stage outputs (None
    on the other rank), this rank's gradients, parameter dtypes and whether FSDP wraps a stage."""
    dims = dims_for(dict(pp=2))
    res = {}
    for name, kwargs, dtype in (("mp", dict(fsdp=FSDPOptions(param_dtype=torch.bfloat16)), None), ("ref", {}, torch.bfloat16)):
        with torch.device("meta"):
            model = build(dtllama.ModelConfig(**config_dict), False)
        for q in model.parameters() if dtype is not None else ():
            q.data = q.data.to(dtype)
        pipe = pipeline_llm(model, dims, options, "cpu", **kwargs)
        pipe.to_empty("cpu")
        pipe.model.init_weights(seed)
        mbs = pipe.split(packed(seqs, labels_list))
        out = pipe.step(mbs, lambda o, i: -(o[0].sum() + ENTROPY_WEIGHT * o[1].sum()))
        outs = None
        if out:
            outs = [mbs.merge([o[k].detach() for o in out[0]]) for k in range(2)]
        res[name] = {"outs": outs, "grads": {hf_name(n): q.grad.detach().clone()
                                             for n, q in pipe.model.named_parameters()},
                     "dtypes": {q.dtype for q in pipe.model.parameters()},
                     "fsdp": any(isinstance(m, FSDPModule) for s in pipe.stage_modules for m in s.modules())}
    return res


def llama4_reference_with_aux(config_dict: dict, seqs, labels_list, seed: int) -> dict:
    """On one rank: the single-device gradients of the log-prob objective plus the load-balance loss of the same
    batch (one microbatch: weight 1)."""
    config = model_config(config_dict)
    model = build(config, False)
    model.init_weights(seed)
    n_global = max(sum(int((lab != IGNORE_INDEX).sum()) for lab in labels_list), 1)
    ids, labels = torch.cat(seqs), torch.cat(labels_list)
    out = model(ids, cu_seqlens=cu_seqlens_from_lengths([len(s) for s in seqs]), labels=labels)
    loss = -(out.logprobs.sum() + ENTROPY_WEIGHT * out.entropy.sum()) / n_global
    if out.router_stats.aux_loss is not None:
        loss = loss + out.router_stats.aux_loss
    loss.backward()
    return {hf_name(n): p.grad.detach().clone() for n, p in model.named_parameters()}
