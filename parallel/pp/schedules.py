"""Pipeline schedules and how a model is cut for them: which schedule runs how many stages per rank and
microbatches, where each stage lives, and which decoder layers each stage holds (balanced by cost)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dtllama.compat import torch_version

from ..dims import ParallelDims


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


def check_options(config, dims: ParallelDims, options: PipelineOptions, causal_lm: bool = True) -> list[list[int]]:
    """Every refusal of a pipeline layout, the same on every rank, before any collective: returns the layers of
    each stage (`causal_lm`: the last stage has the log-prob head, not a value head)."""
    schedule = _schedule_entry(options.schedule)
    v = stages_per_rank(options)
    n_stages = dims.pp * v
    if schedule.splits_backward and torch_version() < (2, 13):
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
