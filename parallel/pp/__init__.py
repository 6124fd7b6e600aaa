"""Pipeline parallelism with `torch.distributed.pipelining`: stages cut from a meta-device model, any schedule.

`pipeline_llm` (torchtitan's name) splits the decoder layers of a meta-device model into `pp * stages_per_rank`
contiguous stages, balancing them with the embedding and the final norm + head counted as layer-equivalents, and
places them on the `pp` ranks ("loop": stage s on rank s % pp; "V" for the V-shaped schedules: rank r holds stages
r and 2*pp-1-r) (`schedules.py`). The model cuts itself into stages (`stages.py`, the model protocol's `cut`);
each stage is parallelized by the same `parallelize` as a whole model (TP/SP, EP, Ulysses, activation
checkpointing, compile, FSDP2) and wrapped in a `PipelineStage`; the schedule is torch's (`runtime.py`).

What a rank gets back (`Pipeline`):
- `model`: this rank's part of the model, an instance of the model's class holding only this rank's layers
  (and the embedding / the head if its stages have them) under their Hugging Face names, so its state dict is
  a slice of the HF one: optimizer, DCP checkpoints, `load_state_into`, `init_weights` and `save_pretrained`
  use it as they use a whole model. The stage modules share its submodules.
- `split(batch)`: a packed batch cut into microbatches by a token budget (sequences are never split; each
  microbatch is padded to exactly `microbatch_tokens`, so every stage sees one static shape), validated on
  every rank before any collective;
- `step(microbatches, loss_fn)` / `forward(microbatches)`: one schedule run. Positions, `cu_seqlens` and
  labels travel with each microbatch to every stage as keyword inputs (RoPE and attention need them on every
  stage, the head its labels on the last); the last stage returns log-probs + entropy (causal LM) or values,
  and, for a causal LM's microbatches without labels, full-vocabulary logits (`forward` only: sampling).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as pp_schedules

from dtllama.models.blocks import StageIO

from ..dims import ParallelDims
from ..options import FSDPOptions
from ..parallelize import parallelize
from .runtime import Pipeline
from .schedules import SCHEDULES, PipelineOptions, check_options, split_layers, stage_rank
from .stages import TiedEmbedding, rank_part, stage_module


def pipeline_llm(model: nn.Module, dims: ParallelDims, options: PipelineOptions, device: torch.device | str, *,
                 temperature: float = 1.0, chunk_size: int = 1024, aux_loss_scale: float | None = None,
                 **parallelize_kwargs) -> Pipeline:
    """Cut the meta-device `model` into this rank's stages, `parallelize` each (`parallelize_kwargs`: ac,
    compile, fsdp), and build the schedule. `dims.build_mesh()` must have run. Then call
    `pipe.to_empty(device)` and `pipe.model.init_weights(seed)` or `load_state_into(pipe.model, path)`.
    `temperature` and `chunk_size` are the causal-LM head's (as in the model's forward). `aux_loss_scale`: the
    weight of each microbatch's auxiliary loss (an MoE's load balance, which each stage adds to its backward);
    None: `cp / microbatches`, the step's mean over microbatches with FSDP's mean over the CP ranks (which each
    compute their group's loss alike) undone, as a whole model's trainer weighs it."""
    layers = check_options(model.config, dims, options, causal_lm=model.plan().output == "logprobs")
    placement = SCHEDULES[options.schedule].placement
    pp_mesh = dims.mesh("pp")
    rank, n_stages = pp_mesh.get_local_rank(), len(layers)
    mine = [s for s in range(n_stages) if stage_rank(s, dims.pp, placement) == rank]
    part = rank_part(model, layers, mine)
    tied = TiedEmbedding.build(model, dims, stage_rank(0, dims.pp, placement),
                               stage_rank(n_stages - 1, dims.pp, placement))
    fsdp = parallelize_kwargs.pop("fsdp", None) or FSDPOptions()
    if fsdp.reshard_after_forward is None:  # every microbatch would all-gather again: keep layers gathered
        fsdp = FSDPOptions(fsdp.param_dtype, fsdp.reduce_dtype, False, fsdp.cpu_offload)
    modules, stages = [], []
    for s in mine:
        aux = dims.cp / options.microbatches if aux_loss_scale is None else aux_loss_scale
        stage = stage_module(part, layers[s], s, n_stages, StageIO(temperature, chunk_size, aux_loss_scale=aux))
        parallelize(stage, dims, fsdp=fsdp, **parallelize_kwargs)
        modules.append(stage)
        stages.append(PipelineStage(stage, s, n_stages, torch.device(device), group=pp_mesh.get_group()))
    pipe = Pipeline(part, modules, stages, None, dims, options, tied)
    cls = getattr(pp_schedules, SCHEDULES[options.schedule].cls)
    kwargs = dict(n_microbatches=options.microbatches, loss_fn=pipe._loss, scale_grads=False)
    pipe.schedule = cls(stages[0], **kwargs) if placement == "single" else cls(stages, **kwargs)
    return pipe


__all__ = ["Pipeline", "PipelineOptions", "SCHEDULES", "check_options", "pipeline_llm", "split_layers", "stage_rank"]
