"""From a config to a parallel model on every rank: the process group, the layout, and the model built once.

A model is built on the meta device (no memory), cut into pipeline stages when `pp > 1`, parallelized (TP/SP, EP,
Ulysses, activation checkpointing, compile, FSDP2), then materialized and initialized from the seed or loaded from
the HF folder, each rank reading only its shards. The layout is checked against the world size and the model
before any collective, so a bad degree is an error rather than a hang.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from dtllama.models.hf_io import load_state_into
from dtllama.parallel import Float8Options, FSDPOptions, ParallelDims, parallelize
from dtllama.parallel.pp import Pipeline, PipelineOptions, check_options, pipeline_llm
from dtllama.train.config import Layout
from dtllama.train.runner import PipelineRunner, WholeRunner


def setup_distributed(seed: int, timeout: float | None = None):
    """Join the process group (collectives waiting at most `timeout` seconds; None: torch's default) and seed
    torch; returns this rank's device and a print of rank 0 only."""
    cuda = torch.cuda.is_available()
    # NCCL for the GPUs, gloo beside it: async checkpointing stages and coordinates on the CPU.
    wait = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo", **wait, **_attempt_store(timeout))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(seed)
    log = tqdm.write if dist.get_rank() == 0 else (lambda *a, **k: None)  # above rank 0's progress bar
    return device, log


def _attempt_store(timeout: float | None) -> dict:
    """Under `torchrun --max-restarts`, a store of this attempt's own keys: the workers of every attempt share the
    agent's store, and a restarted job's ranks would otherwise read the dead ones' addresses (gloo's connect to
    them is refused). Empty (the env:// default) for a first attempt or another launcher."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    wait = datetime.timedelta(seconds=timeout) if timeout is not None else dist.constants.default_pg_timeout
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=wait)
    return {"store": dist.PrefixStore(f"dtllama/attempt-{attempt}", store), "rank": int(os.environ["RANK"]),
            "world_size": int(os.environ["WORLD_SIZE"])}


def resolve_layout(layout: Layout, config) -> ParallelDims:
    """The layout's degrees resolved for this world and checked against the model (no mesh yet)."""
    return layout.dims().resolve(dist.get_world_size(), config)


def pipeline_options(layout: Layout, dims: ParallelDims, config, default_tokens: int) -> PipelineOptions | None:
    """Under pp: the schedule and microbatches of `layout` (`default_tokens` per microbatch unless it sets them,
    rounded up to a multiple of tp*cp), checked against the model; None without pp."""
    if not dims.pp_enabled:
        return None
    tokens = layout.microbatch_tokens or default_tokens
    tokens += -tokens % dims.token_multiple
    options = PipelineOptions(layout.pp_schedule, layout.microbatches, tokens)
    check_options(config, dims, options)
    return options


@dataclass
class Built:
    """A built model on this rank: `model` is the whole model, or under pp this rank's part of it (an instance of
    the model's class holding its stages' layers: optimizer, checkpoints and export use it as a whole one);
    `runner` gives all tokens' outputs on every rank (`dtllama.train.runner`); `pipe` is the pipeline or None."""

    model: torch.nn.Module
    runner: WholeRunner | PipelineRunner
    pipe: Pipeline | None = None


def build_model(cls: type, config, dims: ParallelDims, layout: Layout, device: torch.device, *,
                pipeline: PipelineOptions | None = None, source: str | None = None, seed: int = 0,
                param_dtype: torch.dtype | None = None) -> Built:
    """Meta -> pipeline stages (`pipeline`, under pp) -> parallelize (`layout`'s ac and compile; FSDP computing in
    `param_dtype`) -> materialize -> `init_weights(seed)`, or load the HF folder `source`. `dims.build_mesh()` must
    have run."""
    with torch.device("meta"):
        model = cls(config)
    fsdp = FSDPOptions(param_dtype=param_dtype)
    float8 = None if layout.float8 is None else Float8Options(layout.float8)
    if dims.pp_enabled:
        if pipeline is None:
            raise ValueError(f"{dims} has pp > 1: pass pipeline=pipeline_options(...)")
        pipe = pipeline_llm(model, dims, pipeline, device, ac=layout.ac, compile=layout.compile, fsdp=fsdp,
                            float8=float8)
        pipe.to_empty(device)
        built = Built(pipe.model, PipelineRunner(pipe, dims), pipe)
    else:
        parallelize(model, dims, ac=layout.ac, compile=layout.compile, fsdp=fsdp, float8=float8)
        model.to_empty(device=device)
        built = Built(model, WholeRunner(model, dims))
    if source is None:
        built.model.init_weights(seed)
    else:
        load_state_into(built.model, source)
    return built


__all__ = ["Built", "build_model", "pipeline_options", "resolve_layout", "setup_distributed"]
