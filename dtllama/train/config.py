"""The typed run config of the recipes: small dataclasses of options, one flag per field, and a `--config` TOML file.

A recipe's config is a dataclass of sections (`ModelSource`, `Layout`, `Optim`, ...); `parse_config` turns every
section field into a flag (`dp_shard` -> `--dp-shard`), so a flag means the same thing in every recipe, and reads a
TOML file of the same keys (torchtitan's job configs) under the flags. A section can expose only some of its fields
(`section(Optim, only=("lr",))`) and change their defaults; a field left out keeps its default. `TrainConfig` is the
fine-tuning run of `recipes/train.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tomllib
import typing
from dataclasses import dataclass, field

import dtllama
from dtllama.parallel import AC_MODES, ParallelDims
from dtllama.parallel.pp import SCHEDULES
from dtllama.train.optim import LR_SCHEDULES, NONFINITE_POLICIES


def opt(default, help: str | None = None, **flag) -> dataclasses.Field:
    """A config field with its flag's help (and `choices`, `aliases`, `exclusive` group name)."""
    kind = dict(default_factory=lambda: list(default)) if isinstance(default, list) else dict(default=default)
    return field(**kind, metadata=dict(flag, help=help))


def section(cls: type, *, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = (), **defaults):
    """A config's section of class `cls`: flags for its fields (`only` these, less `skip`), `defaults` changed."""
    return field(default_factory=lambda: cls(**defaults), metadata=dict(only=only, skip=skip))


@dataclass
class ModelSource:
    """What model to train: a Hugging Face folder, or a randomly initialized flavor, with config overrides."""

    model: str | None = opt(None, "Hugging Face folder to train (config.json, *.safetensors, tokenizer files)",
                            aliases=("--init-from-hf",), exclusive="source")
    flavor: str | None = opt(None, "a randomly initialized flavor instead (byte tokens)", choices=list(dtllama.flavors),
                             exclusive="source")
    set: list[str] = opt([], "override a config field of the model, e.g. --set num_hidden_layers=8 (repeatable)",
                         metavar="FIELD=VALUE")
    hf_adapter: bool = opt(False, "run the --model folder's family through transformers' own modules "
                                  "(dtllama.models.hf) even where dtllama has it natively")


@dataclass
class Layout:
    """How the model runs on the ranks: parallel degrees, pipeline schedule, activation checkpointing, compile,
    float8."""

    dp_replicate: int = opt(1, "HSDP replicas")
    dp_shard: int = opt(-1, "FSDP degree; -1: the ranks left over by the other degrees")
    tp: int = opt(1, "tensor parallel degree (with sequence parallel)")
    cp: int = opt(1, "Ulysses context parallel degree (splits each batch's tokens)")
    ep: int = opt(1, "expert parallel degree (MoE models; carved from dp_shard*cp*tp)")
    pp: int = opt(1, "pipeline parallel degree")
    pp_schedule: str = opt("1F1B", "pipeline schedule (with --pp > 1)", choices=list(SCHEDULES))
    microbatches: int = opt(4, "pipeline microbatches per step")
    microbatch_tokens: int | None = opt(None, "tokens per pipeline microbatch (default: enough for a rank's longest "
                                              "share of a step)")
    ac: str = opt("none", "activation checkpointing per layer", choices=list(AC_MODES))
    compile: bool = opt(False, "torch.compile each decoder layer (fullgraph)")
    float8: str | None = opt(None, "float8 matmuls in the decoder layers' linears (torchao: pip install "
                                   "'dtllama[fp8]'), tensor-wise or row-wise scales", choices=["tensorwise", "rowwise"])

    def dims(self) -> ParallelDims:
        return ParallelDims(dp_replicate=self.dp_replicate, dp_shard=self.dp_shard, cp=self.cp, tp=self.tp,
                            pp=self.pp, ep=self.ep)


@dataclass
class Training:
    """The language-model training run: data, steps, and the tokens of a step and of a forward."""

    data: str | None = opt(None, "text file (documents separated by blank lines), a folder of .txt/.jsonl files, or "
                                 "JSONL rows {text}, {prompt, response} or {messages} (SFT: loss on the response / "
                                 "assistant tokens)")
    steps: int = opt(12)
    batch_tokens: int = opt(1024, "tokens per step over all data-parallel ranks")
    max_seq_len: int = opt(512, "longest sequence (longer ones are errors without --truncate)")
    truncate: bool = opt(False, "cut sequences longer than --max-seq-len")
    max_tokens_per_microbatch: int | None = opt(
        None, "token budget of a forward/backward: a rank's sequences are packed first-fit into micro-batches of at "
              "most this many tokens and their gradients accumulated (default: --batch-tokens)")

    def pipeline_tokens(self, microbatches: int) -> int:
        """Tokens of a pipeline microbatch that always fit a step's sequences: the longest one + an even share."""
        return self.max_seq_len + -(-self.batch_tokens // microbatches)


@dataclass
class Optim:
    """AdamW and its LR schedule, and what a non-finite step does."""

    lr: float = opt(1e-4, "learning rate (the peak of the schedule)")
    warmup_steps: int = opt(2, "linear LR warm-up steps")
    lr_schedule: str = opt("cosine", "after warm-up: decay to the floor", choices=list(LR_SCHEDULES))
    min_lr_ratio: float = opt(0.1, "the LR floor at the last step, as a fraction of --lr")
    weight_decay: float = opt(0.1, "AdamW weight decay (not on norms and biases)")
    on_nonfinite: str = opt("stop", "a step whose loss or gradient norm is NaN/inf: stop the run, or skip the step",
                            choices=list(NONFINITE_POLICIES))


@dataclass
class Checkpointing:
    """Sharded training-state checkpoints (DCP) and resuming from them."""

    checkpoint_dir: str | None = opt(None, "folder of sharded training-state checkpoints (DCP)")
    checkpoint_every: int = opt(0, "save every N steps (0: only at the end)")
    keep_last: int = opt(2, "complete checkpoints to keep")
    async_checkpoint: bool = opt(False, "save in the background (dcp.async_save)")
    resume: bool = opt(False, "continue from the newest checkpoint in --checkpoint-dir (a broken one is named and the "
                               "previous one taken)")
    on_save_error: str = opt("stop", "when a save fails (e.g. a full disk): 'stop' the run, or 'continue' without that "
                                     "checkpoint; its partial folder is removed either way", choices=["stop", "continue"])


@dataclass
class Logging:
    """Where per-step metrics go besides the console (rank 0 writes them)."""

    metrics: str | None = opt(None, "write per-step metrics as JSON lines to this file (rank 0)")
    tensorboard: str | None = opt(None, "also write the metrics as TensorBoard scalars to this folder (rank 0; needs "
                                        "the tensorboard package)")


@dataclass
class Export:
    """The Hugging Face folder written at the end, and the prompt `transformers` continues from it."""

    export_hf: str = opt("out/finetuned", "folder for the exported HF checkpoint ('' to skip)")
    prompt: str = opt("Question: What is the capital of France?\nAnswer:")
    max_new_tokens: int = opt(24, "tokens of the greedy continuation")


@dataclass
class Job:
    """The seed of everything random (init, data order, sampling), and how errors are shown."""

    seed: int = opt(0)
    debug: bool = opt(False, "show tracebacks of errors (otherwise one line from rank 0)")
    timeout: float = opt(1800.0, "seconds a collective may wait for the other ranks; then the run stops, naming the "
                                 "rank it waited for (a rank whose step has not moved for twice that prints its "
                                 "stacks and exits)")


class RunConfig:
    """Base of a recipe's config dataclass. Flag names are unique over its sections, so a flag's value is also an
    attribute of the whole config: `cfg.steps` is `cfg.training.steps`."""

    def __getattr__(self, name: str):
        for f in dataclasses.fields(self):
            part = self.__dict__.get(f.name)
            if dataclasses.is_dataclass(part) and name in {g.name for g in dataclasses.fields(part)}:
                return getattr(part, name)
        raise AttributeError(f"{type(self).__name__} has no section or option {name!r}")


@dataclass
class TrainConfig(RunConfig):
    """The run of `recipes/train.py`: fine-tune (or pretrain) a causal LM on packed batches."""

    source: ModelSource = section(ModelSource)
    layout: Layout = section(Layout)
    training: Training = section(Training)
    optim: Optim = section(Optim)
    checkpoint: Checkpointing = section(Checkpointing)
    logging: Logging = section(Logging)
    export: Export = section(Export)
    job: Job = section(Job)


def parse_args(argv: list[str] | None = None, **kw) -> TrainConfig:
    """`TrainConfig` from flags and `--config` (see `parse_config`)."""
    return parse_config(TrainConfig, argv, **kw)


def parse_config(cls: type, argv: list[str] | None = None, *, description: str | None = None, prog: str | None = None,
                 defaults: dict | None = None):
    """An instance of the config dataclass `cls` from `argv` over a `--config` TOML file over `defaults` (flag name
    -> value) over the sections' own defaults. TOML keys are the flags ('-' or '_'); an unknown key is an error
    naming the file and the key. The model's source is one of `model` / `flavor`: a flag beats the file."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a TOML file of these options (keys as the flags, '-' or '_'); flags "
                                         "override it")
    parts = {}
    for f in dataclasses.fields(cls):
        part = f.default_factory()
        parts[f.name] = part, _flag_names(f, part)
    for part, names in parts.values():
        _add_flags(parser, part, names)
    if defaults:
        unknown = set(defaults) - {n for _, names in parts.values() for n in names}
        if unknown:
            raise TypeError(f"defaults for unknown flags {sorted(unknown)}")
        parser.set_defaults(**defaults)
    path, table = _read_toml(parser, argv)
    args = parser.parse_args(argv)
    _one_source(args, sys.argv[1:] if argv is None else argv, path, table)
    return cls(**{name: dataclasses.replace(part, **{n: getattr(args, n) for n in names})
                  for name, (part, names) in parts.items()})


def _flag_names(f: dataclasses.Field, part) -> list[str]:
    """The fields of the section `part` (the config's field `f`) that get flags."""
    names = [g.name for g in dataclasses.fields(part)]
    only, skip = f.metadata.get("only"), f.metadata.get("skip", ())
    return [n for n in names if (only is None or n in only) and n not in skip]


def _add_flags(parser: argparse.ArgumentParser, part, names: list[str]) -> None:
    """One flag per named field of the section `part`, with its current value as the default."""
    hints = typing.get_type_hints(type(part))
    group = parser.add_argument_group(type(part).__name__, (type(part).__doc__ or "").split("\n")[0])
    exclusive = {}
    for f in dataclasses.fields(part):
        if f.name not in names:
            continue
        meta = dict(f.metadata)
        flags = [f"--{f.name.replace('_', '-')}", *meta.pop("aliases", ())]
        where = group
        if "exclusive" in meta:
            name = meta.pop("exclusive")
            if name not in exclusive:
                exclusive[name] = group.add_mutually_exclusive_group()
            where = exclusive[name]
        kind = hints[f.name]
        args = typing.get_args(kind)
        kind = next(a for a in args if a is not type(None)) if type(None) in args else kind
        default = getattr(part, f.name)
        if kind is bool:
            where.add_argument(*flags, dest=f.name, action="store_true", default=default, **meta)
        elif typing.get_origin(kind) is list:
            where.add_argument(*flags, dest=f.name, action="append", default=list(default), **meta)
        else:
            where.add_argument(*flags, dest=f.name, type=kind, default=default, **meta)


def _read_toml(parser: argparse.ArgumentParser, argv) -> tuple[str | None, dict]:
    """Set the parser's defaults from the `--config` file, if any; returns its path and table."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv)[0].config
    if not path:
        return None, {}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path!r}: no such file")
    with open(path, "rb") as f:
        try:
            table = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
    dests = {a.dest for a in parser._actions} - {"config", "help"}
    values = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest not in dests:
            raise ValueError(f"{path}: unknown key {key!r}; the keys are the flags of {parser.prog} "
                             f"({', '.join(sorted(dests))})")
        values[dest] = value
    parser.set_defaults(**values)
    return path, {k.replace("-", "_"): v for k, v in table.items()}


def _one_source(args: argparse.Namespace, given: list[str], path: str | None, table: dict) -> None:
    """Keep one of `model` / `flavor` when both are set: the command line's, else the file's model over a recipe's
    default flavor; a file that sets both is an error."""
    if getattr(args, "model", None) is None or getattr(args, "flavor", None) is None:
        return
    flags = {a.split("=")[0] for a in given}
    if "--flavor" in flags:
        args.model = None
    elif {"--model", "--init-from-hf"} & flags:
        args.flavor = None
    elif "model" in table and "flavor" in table:
        raise ValueError(f"{path}: sets both model and flavor; keep one")
    else:
        args.flavor = None


__all__ = ["Checkpointing", "Export", "Job", "Layout", "Logging", "ModelSource", "Optim", "RunConfig", "TrainConfig",
           "Training", "opt", "parse_args", "parse_config", "section"]
