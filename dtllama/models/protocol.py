"""The model protocol: what the parallel layer needs to know of a family, declared by the family itself.

`dtllama.parallel` never asks which family a model is. It reads:

- the HF module tree every family shares: `model.model` holds `embed_tokens` (or None), `layers` (a ModuleDict
  keyed by layer index), `norm` (or None); a native family's is a `blocks.Decoder`, whose forward takes
  `(x, position_ids, cu_seqlens, max_seqlen)`, the Hugging Face adapter's is transformers' own decoder;
- `model.plan()` -> `ModelPlan`: the TP styles of the embedding, final norm and head, what the model outputs,
  its token-statistic hook points, whether it casts parameters at use;
- `model.layer_plan(layer)` -> `LayerPlan` for each decoder layer (a native layer's own `layer.plan()`): TP styles
  by submodule, the attention cores Ulysses wraps, the routed experts EP shards, the parts compiled apart;
- `model.cut(layers, first, last, stage)`: a model holding some layers (a pipeline stage or a rank's part),
  sharing the modules of `model`, whose forward is a pipeline stage's when `stage` is given;
- `model.balanced_moe()`: the MoE blocks that balance by bias (`moe.MoEBlock`), whose counts `balance_experts`
  sums over ranks after each step;
- `config.tp_widths()`: the SwiGLU widths TP splits, by field name (for the error naming valid degrees);
- `model.check_media(input_ids, cu_seqlens, media)`: the batch check's test of a batch's images and videos (a
  model without a vision tower refuses any; `blocks.PretrainedModel` has it).

The TP styles are plain descriptions (the model knows no mesh); `parallel/tp.py` maps each to a torch
`ParallelStyle`. A new family declares these in its own file and needs no edit under `parallel/`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Style:
    """A tensor-parallel role of one submodule."""


@dataclass(frozen=True)
class Colwise(Style):
    """Output features split over TP ranks (q, gate, up projections)."""


@dataclass(frozen=True)
class Rowwise(Style):
    """Input features split; the partial output reduce-scattered back to token shards (o, down projections)."""


@dataclass(frozen=True)
class RowwiseReplicated(Style):
    """Input features split; the partial output all-reduced to every rank: TP without sequence parallel, the residual
    stream replicated (a transformers `base_model_tp_plan`'s "rowwise")."""


@dataclass(frozen=True)
class ColwiseGathered(Style):
    """Output features split, then all-gathered (transformers' "colwise_gather_output": a fused projection that
    its module splits itself)."""


@dataclass(frozen=True)
class RowwiseOfFull(Style):
    """A replicated input split here; the partial output all-reduced (transformers' "rowwise_split_input")."""


@dataclass(frozen=True)
class VocabEmbeddingReplicated(Style):
    """Embedding rows split by vocabulary; output all-reduced (transformers' "embedding_rowwise")."""


@dataclass(frozen=True)
class KVProjection(Style):
    """k/v projection: column-wise when TP divides the KV heads, else replicated and one KV head kept per rank."""


@dataclass(frozen=True)
class TokenShardedNorm(Style):
    """A norm on this rank's token shard (sequence parallel)."""


@dataclass(frozen=True)
class HeadNorm(Style):
    """A norm over each head's features, run on `[tokens * local heads, head_dim]` rows: weight replicated over the
    TP ranks (each holding other heads), its gradient summed over them."""


@dataclass(frozen=True)
class AllTokens(Style):
    """A block whose first input is all-gathered from token shards; `n_args` positional inputs, the rest pass."""

    n_args: int = 1


@dataclass(frozen=True)
class OwnTokens(Style):
    """A block that works on this rank's token shard as a plain tensor (an MoE: routing is per token)."""


@dataclass(frozen=True)
class Router(Style):
    """A router linear over this rank's tokens with its weight replicated (gradient complete on every rank)."""


@dataclass(frozen=True)
class VocabEmbedding(Style):
    """Embedding rows split by vocabulary; output reduce-scattered to token shards."""


@dataclass(frozen=True)
class VocabHead(Style):
    """An output head whose weight is split by vocabulary rows (the fused log-prob op is vocab-parallel)."""


@dataclass(frozen=True)
class ReplicatedHead(Style):
    """A small head (a value `score`) replicated on every TP rank and fed all tokens."""


@dataclass(frozen=True)
class LayerPlan:
    """What the parallel layer needs of one decoder layer.

    tp: TP style of each submodule (dotted path inside the layer). attn_cores: the attention cores (module paths)
    Ulysses wraps. experts: the routed experts module EP shards (None: a dense layer). compile_parts: submodules
    compiled one by one instead of the layer whole (an MoE layer, whose routed experts stay eager)."""

    tp: dict[str, Style]
    attn_cores: tuple[str, ...] = ("self_attn.attn_core",)
    experts: str | None = None
    compile_parts: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ModelPlan:
    """What the parallel layer needs of the model around its layers.

    tp: TP style of the embedding, final norm and head (those this model or stage holds). output: "logprobs" (a
    causal LM, which under CP takes its labels' token shard at `logprobs_head`) or "values". token_sums: identity
    modules (`blocks.TokenSum`) where statistics of this rank's tokens are summed over the ranks holding the others.
    casts_at_use: every module casts its parameters to the activations' dtype, so one-rank mixed precision needs
    no FSDP. tied: the head reads `model.embed_tokens.weight` (a pipeline's last stage keeps a copy). inputs: the
    module whose forward takes the packed batch `(x, position_ids, cu_seqlens, max_seqlen)` positionally and hands
    it to the layers (CP slices the token inputs at it): the decoder of a native family."""

    tp: dict[str, Style]
    output: str = "logprobs"
    token_sums: tuple[str, ...] = ()
    casts_at_use: bool = False
    tied: bool = False
    inputs: str = "model"


def attention_plan(n_args: int) -> dict[str, Style]:
    """The TP styles of a pre-norm attention block with q/k/v/o projections (every family so far)."""
    return {
        "input_layernorm": TokenShardedNorm(),
        "self_attn": AllTokens(n_args),
        "self_attn.q_proj": Colwise(),
        "self_attn.k_proj": KVProjection(),
        "self_attn.v_proj": KVProjection(),
        "self_attn.o_proj": Rowwise(),
        "post_attention_layernorm": TokenShardedNorm(),
    }


def swiglu_plan(prefix: str) -> dict[str, Style]:
    """A SwiGLU on all tokens: column-wise gate/up, row-wise down reduce-scattered back to tokens."""
    return {prefix: AllTokens(1), f"{prefix}.gate_proj": Colwise(), f"{prefix}.up_proj": Colwise(),
            f"{prefix}.down_proj": Rowwise()}
