"""Pipeline parallelism with `torch.distributed.pipelining`: stages cut from a meta-device model, any schedule.

`pipeline_llm` (torchtitan's name) splits the decoder layers of a meta-device model into `pp * stages_per_rank`
contiguous stages, balancing them with the embedding and the final norm + head counted as layer-equivalents,
and places them on the `pp` ranks ("loop": stage s on rank s % pp; "V" for the V-shaped schedules: rank r holds
stages r and 2*pp-1-r). Each stage is then parallelized by the same `parallelize` as a whole model (TP/SP,
Ulysses, activation checkpointing, compile, FSDP2) and wrapped in a `PipelineStage`; the schedule is torch's.

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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as pp_schedules

from dtllama.models.llama import LlamaForCausalLM, LlamaForValue, LlamaModel
from dtllama.ops import Packed, linear_logits, prepare_batch
from dtllama.ops.packing import Microbatches, split_microbatches

from .batch_check import agree_on_error
from .dims import ParallelDims
from .options import FSDPOptions
from .parallelize import parallelize

class Schedule(NamedTuple):
    cls: str  # in torch.distributed.pipelining.schedules
    placement: str  # "single" (one stage per rank), "loop" or "V"
    min_microbatches: Callable[[int, int], int]  # of (pp, stages per rank)
    splits_backward: bool  # input- and weight-gradient passes apart (zero bubble)


SCHEDULES: dict[str, Schedule] = {
    "GPipe": Schedule("ScheduleGPipe", "single", lambda pp, v: 1, False),
    "1F1B": Schedule("Schedule1F1B", "single", lambda pp, v: pp, False),
    "Interleaved1F1B": Schedule("ScheduleInterleaved1F1B", "loop", lambda pp, v: pp, False),
    "LoopedBFS": Schedule("ScheduleLoopedBFS", "loop", lambda pp, v: 1, False),
    "InterleavedZeroBubble": Schedule("ScheduleInterleavedZeroBubble", "loop", lambda pp, v: pp, True),
    "ZBVZeroBubble": Schedule("ScheduleZBVZeroBubble", "V", lambda pp, v: pp * v, True),
    "DualPipeV": Schedule("ScheduleDualPipeV", "V", lambda pp, v: pp * v, True),
}


@dataclass(frozen=True)
class PipelineOptions:
    """How the model is cut and scheduled.

    schedule: one of `SCHEDULES`. microbatches: microbatches per step. microbatch_tokens: each microbatch's
    token count (a budget sequences are packed into first-fit, then padded to it; a multiple of tp*cp).
    stages_per_rank: 1 for GPipe/1F1B, 2 for the V schedules; interleaved ones default to 2.
    stage_layers: explicit decoder layers of each stage (contiguous, in order), instead of the balanced split.
    embed_cost / head_cost: the embedding and the final norm + head in decoder-layer equivalents, for balancing;
    unset, they are estimated from the config (`default_costs`).
    """

    schedule: str = "1F1B"
    microbatches: int = 4
    microbatch_tokens: int = 1024
    stages_per_rank: int | None = None
    stage_layers: tuple[tuple[int, ...], ...] | None = None
    embed_cost: float | None = None
    head_cost: float | None = None


def _schedule_entry(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {list(SCHEDULES)}")
    return SCHEDULES[name]


def stages_per_rank(options: PipelineOptions) -> int:
    """The number of stages each rank holds, checked against what the schedule runs."""
    placement = _schedule_entry(options.schedule).placement
    v = options.stages_per_rank or (1 if placement == "single" else 2)
    need = {"single": "exactly 1", "V": "exactly 2", "loop": "at least 2"}[placement]
    if (placement == "single" and v != 1) or (placement == "V" and v != 2) or (placement == "loop" and v < 2):
        raise ValueError(f"schedule {options.schedule} runs {need} stage(s) per rank, got stages_per_rank={v}; "
                         "leave stages_per_rank unset for the schedule's default")
    return v


def stage_rank(stage: int, pp: int, placement: str) -> int:
    """The pp rank of a stage: round robin ("loop", "single"), or V-shaped (rank r: stages r and 2pp-1-r)."""
    if placement == "V":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def split_layers(n_layers: int, n_stages: int, embed_cost: float = 1.0, head_cost: float = 1.0) -> list[list[int]]:
    """Contiguous layer ranges for `n_stages` stages that minimize the most expensive stage, each stage at least
    one layer; the first stage also pays `embed_cost` and the last `head_cost` (in layers). Ties go to the split
    whose earlier stages are larger."""
    if n_stages > n_layers:
        raise ValueError(f"{n_stages} pipeline stages need at least {n_stages} decoder layers, the model has "
                         f"{n_layers}; lower pp or stages_per_rank (or add layers: --set num_hidden_layers=N)")

    def cost(stage: int, a: int, b: int) -> float:
        return (b - a) + (embed_cost if stage == 0 else 0.0) + (head_cost if stage == n_stages - 1 else 0.0)

    # best[s][i]: the smallest max cost of stages s.. over layers i..; cut[s][i]: where stage s ends.
    inf = math.inf
    best = [[inf] * (n_layers + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n_layers + 1) for _ in range(n_stages + 1)]
    best[n_stages][n_layers] = 0.0
    for s in range(n_stages - 1, -1, -1):
        for i in range(n_layers - (n_stages - s), -1, -1):
            for j in range(n_layers - (n_stages - s - 1), i, -1):  # larger stages first: they win ties
                c = max(cost(s, i, j), best[s + 1][j])
                if c < best[s][i]:
                    best[s][i], cut[s][i] = c, j
    out, i = [], 0
    for s in range(n_stages):
        out.append(list(range(i, cut[s][i])))
        i = cut[s][i]
    return out


def _check_stage_layers(stage_layers, n_layers: int, n_stages: int) -> list[list[int]]:
    layers = [list(s) for s in stage_layers]
    flat = [i for s in layers for i in s]
    if len(layers) != n_stages or any(not s for s in layers) or flat != list(range(n_layers)):
        raise ValueError(f"stage_layers={stage_layers} must give each of the {n_stages} stages a non-empty, "
                         f"contiguous run of the decoder layers 0..{n_layers - 1}, in order, each layer once")
    return layers


def default_costs(config, causal_lm: bool = True) -> tuple[float, float]:
    """(embedding, head) cost in decoder layers, by matmul FLOPs. A layer runs 3 matmuls per weight (forward and
    two backward); the fused log-prob head 4 over its `vocab x hidden` weight (its backward recomputes the
    logits). The embedding is a row gather and a value head one column: both ~0. On the Llama-3.2-1B shape
    the head costs ~5.8 layers: splitting as if it cost one leaves the last stage a third busier than the first."""
    h, d = config.hidden_size, config.head_dim
    layer = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads) + 3 * h * config.intermediate_size
    return 0.0, (4 / 3 * config.vocab_size * h / layer if causal_lm else 0.0)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def check_options(config, dims: ParallelDims, options: PipelineOptions, causal_lm: bool = True) -> list[list[int]]:
    """Every refusal of a pipeline layout, the same on every rank, before any collective: returns the layers of
    each stage (`causal_lm`: the last stage has the log-prob head, not a value head)."""
    schedule = _schedule_entry(options.schedule)
    v = stages_per_rank(options)
    n_stages = dims.pp * v
    if config.tie_word_embeddings:
        raise ValueError("tie_word_embeddings=True shares model.embed_tokens.weight between the first and the last "
                         "pipeline stage, which live on different ranks; untie it (--set tie_word_embeddings=false, "
                         "an untied copy of the checkpoint) or use pp=1")
    if schedule.splits_backward and _torch_version() < (2, 13):
        # torch 2.11's weight-gradient pass calls autograd.grad on graph edges of custom autograd functions (the
        # fused norm and log-prob ops), which read `node._input_metadata` and fail. Seen on 2.11; runs on 2.13.
        raise ValueError(f"schedule {options.schedule} splits backward into input- and weight-gradient passes, "
                         f"which torch {torch.__version__} cannot run through dtllama's fused ops; use 1F1B or "
                         "Interleaved1F1B, or torch >= 2.13")
    need = schedule.min_microbatches(dims.pp, v)
    if options.microbatches < need:
        raise ValueError(f"schedule {options.schedule} with pp={dims.pp} and {v} stage(s) per rank needs at least "
                         f"{need} microbatches, got microbatches={options.microbatches}")
    if schedule.placement == "loop" and options.schedule != "LoopedBFS" and options.microbatches % dims.pp:
        raise ValueError(f"schedule {options.schedule} runs microbatches in rounds of pp={dims.pp}; "
                         f"microbatches={options.microbatches} must be a multiple of {dims.pp}")
    m = dims.token_multiple
    if options.microbatch_tokens < 1 or options.microbatch_tokens % m:
        raise ValueError(f"microbatch_tokens={options.microbatch_tokens} must be a positive multiple of tp*cp={m} "
                         "(sequence parallel and Ulysses split each microbatch's tokens evenly)")
    if options.stage_layers is not None:
        return _check_stage_layers(options.stage_layers, config.num_hidden_layers, n_stages)
    embed, head = default_costs(config, causal_lm)
    embed = embed if options.embed_cost is None else options.embed_cost
    head = head if options.head_cost is None else options.head_cost
    return split_layers(config.num_hidden_layers, n_stages, embed, head)


class PipelineStageForward:
    """Forward of one pipeline stage (mixed into the model's class, so `isinstance`, `init_weights` and the
    parallelisms treat a stage as the model it is cut from).

    The first stage takes token ids, the others the previous stage's hidden states; the microbatch's
    positions, `cu_seqlens` (padded with repeats of T, `num_seqs` real) and labels come as keywords. The last
    stage returns `(log-probs, entropy)` of the labels (causal LM; without labels, the full-vocabulary logits) or
    the values; the others their hidden states.
    """

    def forward(self, x, position_ids, cu_seqlens, num_seqs, max_seqlen, labels=None):
        cu = cu_seqlens[: int(num_seqs) + 1]
        h = self.model(x, position_ids, cu, int(max_seqlen))
        if self.model.norm is None:
            return h
        if isinstance(self, LlamaForValue):
            return self.score(h).squeeze(-1).float()
        weight = self.output_weight.to(h.dtype)  # fp32 parameters with low-precision activations: cast at use
        if labels is None:
            return linear_logits(h, weight, self.temperature)
        return self.logprobs_head(h, weight, labels, self.temperature, self.chunk_size)


def _stage_class(cls: type) -> type:
    return type(f"{cls.__name__}Stage", (PipelineStageForward, cls), {})


def _empty_module(cls: type) -> nn.Module:
    """An instance of `cls` with no submodules yet (stages assemble theirs from the rank's part)."""
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    return m


def _cut(model: LlamaForCausalLM | LlamaForValue, layers: list[int], first: bool, last: bool, cls: type) -> nn.Module:
    """A `cls` instance holding `layers` of `model` (and its embedding / head when first / last): the same module
    objects, so parameters are shared and names stay Hugging Face's."""
    part = _empty_module(cls)
    part.config = model.config
    inner = _empty_module(LlamaModel)
    inner.embed_tokens = model.model.embed_tokens if first else None
    inner.layers = nn.ModuleDict({str(i): model.model.layers[str(i)] for i in layers})
    inner.norm = model.model.norm if last else None
    inner.rotary_emb = model.model.rotary_emb
    part.model = inner
    for name in ("lm_head", "logprobs_head", "score"):  # the heads of the causal LM, or the value head
        if hasattr(model, name):
            setattr(part, name, getattr(model, name) if last else None)
    return part


class Pipeline:
    """This rank's stages, the schedule that runs them, and `model`: this rank's part of the model (what the
    optimizer steps and checkpoints save). Build it with `pipeline_llm`."""

    def __init__(self, model: nn.Module, stage_modules: list[nn.Module], stages: list[PipelineStage], schedule,
                 dims: ParallelDims, options: PipelineOptions):
        self.model, self.stage_modules, self.stages, self.schedule = model, stage_modules, stages, schedule
        self.dims, self.options = dims, options
        self._loss_fn: Callable | None = None
        self._logits_schedule = None  # built at the first forward without labels

    @property
    def has_last_stage(self) -> bool:
        return any(s.is_last for s in self.stages)

    def to_empty(self, device) -> None:
        """Materialize the meta-device parameters (through the FSDP-wrapped stages, which own them)."""
        for m in self.stage_modules:
            m.to_empty(device=device)

    def split(self, batch: Packed) -> "Microbatches":
        """Cut this rank's packed batch into the microbatches of one step; a batch that is invalid or does not fit
        raises the same ValueError on every rank (one all-reduce), before the schedule's first collective."""
        error, mbs = None, None
        try:
            prepare_batch(batch.input_ids, self.model.config.vocab_size, batch.position_ids, batch.cu_seqlens,
                          batch.max_seqlen, batch.labels)
            mbs = split_microbatches(batch, self.options.microbatches, self.options.microbatch_tokens)
        except ValueError as e:
            error = str(e)
        agree_on_error(error, self.dims.mesh("flat"))
        return mbs

    def step(self, mbs: "Microbatches", loss_fn: Callable[[object, int], torch.Tensor]) -> tuple[list, list] | None:
        """Forward and backward over all microbatches. `loss_fn(output, i)` turns the last stage's output of
        microbatch i into the loss to backpropagate (gradients of all microbatches add up; nothing is rescaled).
        The first step may also call it on placeholder outputs (torch infers the stages' shapes with a forward
        and backward), so keep it free of side effects. Returns `(outputs, losses)` of the last stage, detached,
        one per microbatch; None on ranks without the last stage."""
        if isinstance(self.model, LlamaForCausalLM) and mbs.packed[0].labels is None:
            raise ValueError("a causal LM's pipeline trains on log-probs: pass labels (see dtllama.ops.shift_labels)")
        self._loss_fn = loss_fn
        losses: list[torch.Tensor] = []
        out = self.schedule.step(*self._args(mbs), target=torch.arange(len(mbs.packed)), losses=losses, **mbs.kwargs())
        if not self.has_last_stage:
            return None
        return self._outputs(out, mbs), [x.detach() for x in losses]

    @torch.no_grad()
    def forward(self, mbs: "Microbatches") -> list | None:
        """The last stage's outputs of every microbatch, no backward (old / reference log-probs, values; a causal
        LM's logits for microbatches without labels); None on ranks without the last stage."""
        if isinstance(self.model, LlamaForCausalLM) and mbs.packed[0].labels is None:
            self._logits_schedule = self._logits_schedule or self._eval_schedule()
            out = self._logits_schedule.eval(*self._args(mbs), **mbs.kwargs())
        else:  # the training schedule computes its loss in eval too: give it one that costs nothing
            self._loss_fn = lambda output, i: torch.zeros(())
            out = self.schedule.eval(*self._args(mbs), target=torch.arange(len(mbs.packed)), **mbs.kwargs())
        return self._outputs(out, mbs) if self.has_last_stage else None

    def _eval_schedule(self):
        """A schedule over new `PipelineStage`s of the same stage modules: torch fixes a stage's output shape at
        its first run, and logits (`[tokens, vocab]`) are not the log-probs the training schedule returns."""
        stages = [PipelineStage(st.submod, st.stage_index, st.num_stages, st.device, group=st.group)
                  for st in self.stages]
        cls = type(self.schedule)
        kwargs = dict(n_microbatches=self.options.microbatches, scale_grads=False)
        single = SCHEDULES[self.options.schedule].placement == "single"
        return cls(stages[0], **kwargs) if single else cls(stages, **kwargs)

    def _args(self, mbs: "Microbatches") -> tuple:
        """Token ids go to the first stage only (torch 2.11 refuses positional inputs on the other ranks)."""
        return mbs.args() if any(s.is_first for s in self.stages) else ()

    def _loss(self, output, target):
        return self._loss_fn(output, int(target))

    def _outputs(self, out, mbs: "Microbatches") -> list:
        m = len(mbs.packed)
        parts = [x.detach().chunk(m) for x in (out if isinstance(out, tuple) else (out,))]
        return [tuple(p[i] for p in parts) if len(parts) > 1 else parts[0][i] for i in range(m)]


def pipeline_llm(model: LlamaForCausalLM | LlamaForValue, dims: ParallelDims, options: PipelineOptions,
                 device: torch.device | str, *, temperature: float = 1.0, chunk_size: int = 1024,
                 **parallelize_kwargs) -> Pipeline:
    """Cut the meta-device `model` into this rank's stages, `parallelize` each (`parallelize_kwargs`: ac,
    compile, fsdp, param_dtype), and build the schedule. `dims.build_mesh()` must have run. Then call
    `pipe.to_empty(device)` and `pipe.model.init_weights(seed)` or `load_state_into(pipe.model, path)`.
    `temperature` and `chunk_size` are the causal-LM head's (as in the model's forward)."""
    layers = check_options(model.config, dims, options, causal_lm=isinstance(model, LlamaForCausalLM))
    placement = SCHEDULES[options.schedule].placement
    pp_mesh = dims.mesh("pp")
    rank, n_stages = pp_mesh.get_local_rank(), len(layers)
    mine = [s for s in range(n_stages) if stage_rank(s, dims.pp, placement) == rank]
    part = _cut(model, sorted(i for s in mine for i in layers[s]), 0 in mine, n_stages - 1 in mine, type(model))
    fsdp = parallelize_kwargs.pop("fsdp", None) or FSDPOptions(param_dtype=parallelize_kwargs.pop("param_dtype", None))
    if fsdp.reshard_after_forward is None:  # every microbatch would all-gather again: keep layers gathered
        fsdp = FSDPOptions(fsdp.param_dtype, fsdp.reduce_dtype, False, fsdp.cpu_offload)
    modules, stages = [], []
    for s in mine:
        stage = _cut(part, layers[s], s == 0, s == n_stages - 1, _stage_class(type(model)))
        stage.temperature, stage.chunk_size = temperature, chunk_size
        parallelize(stage, dims, fsdp=fsdp, **parallelize_kwargs)
        modules.append(stage)
        stages.append(PipelineStage(stage, s, n_stages, torch.device(device), group=pp_mesh.get_group()))
    pipe = Pipeline(part, modules, stages, None, dims, options)
    cls = getattr(pp_schedules, SCHEDULES[options.schedule].cls)
    kwargs = dict(n_microbatches=options.microbatches, loss_fn=pipe._loss, scale_grads=False)
    pipe.schedule = cls(stages[0], **kwargs) if placement == "single" else cls(stages, **kwargs)
    return pipe


__all__ = ["Pipeline", "PipelineOptions", "SCHEDULES", "pipeline_llm", "split_layers", "stage_rank"]
