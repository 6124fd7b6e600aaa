"""Building blocks every family shares, written once: norms, casting linears, RoPE frequencies, the attention core,
SwiGLU, the decoder (embedding -> layers -> norm), the heads, and the base class of a family's models.

A family (`llama.py`, `llama4.py`) supplies its decoder layer and what its forward passes the layers; the base
classes here give it HF names, layout-independent init, HF I/O, the causal-LM and value heads, pipeline cutting and
the model protocol (`protocol.py`) the parallel layer reads.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dtllama.models import protocol as P
from dtllama.models.moe import balanced_blocks
from dtllama.ops import (
    CrossEntropy, linear_cross_entropy, linear_logits, linear_logprobs_entropy, linear_topk_logprobs, prepare_batch, rms_norm, varlen_attention,
)
from dtllama.compat import local_shape_and_offset
from dtllama.ops.logprobs import SAVE_BYTES


# The causal LM's visual inputs, as transformers' VL processors name them (a VL model of the Hugging Face adapter).
MEDIA = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def hf_name(name: str) -> str:
    """A parameter's HF name: without the prefixes wrappers add (activation checkpointing, compile)."""
    return name.replace("._checkpoint_wrapped_module", "").replace("._orig_mod", "")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight.to(x.dtype), self.eps)


class Linear(nn.Linear):
    """`nn.Linear` that casts its parameters to the input's dtype where it uses them: a no-op when they already
    match (fp32 training, FSDP's low-precision copies); under one-rank mixed precision (fp32 parameters, bf16
    activations: `dtllama.parallel.apply_mixed_precision`) the cast is the only copy, and its backward hands
    the fp32 parameter an fp32 gradient."""

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def rope_inv_freq(config, device=None) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, with `linear` or `llama3` scaling as HF computes them."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """The `inv_freq` buffer of a family's rotary embedding (its forward is the family's: halves or pairs)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def reset_parameters(self):
        """Recompute the buffer after `to_empty` (it is not part of any checkpoint)."""
        self.inv_freq = rope_inv_freq(self.config, self.inv_freq.device)

    def angles(self, position_ids: torch.Tensor) -> torch.Tensor:
        return position_ids.float()[:, None] * self.inv_freq.float()[None, :]


class AttentionCore(nn.Module):
    """Packed causal attention `[T, H, D]`; its own module so context parallelism can wrap it. `options`: the
    scale, window, softcap and sinks of `varlen_attention`, for a family that uses them."""

    def forward(self, q, k, v, cu_seqlens, max_seqlen, **options):
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, **options)


class Attention(nn.Module):
    """q/k/v/o projections and the attention core; a family's forward places RoPE and norms between them."""

    def __init__(self, config, qkv_bias: bool, o_bias: bool):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.head_dim = d
        self.q_proj = Linear(h, config.num_attention_heads * d, bias=qkv_bias)
        self.k_proj = Linear(h, config.num_key_value_heads * d, bias=qkv_bias)
        self.v_proj = Linear(h, config.num_key_value_heads * d, bias=qkv_bias)
        self.o_proj = Linear(config.num_attention_heads * d, h, bias=o_bias)
        self.attn_core = AttentionCore()

    def qkv(self, x):
        """`[T, heads, D]` each; -1 heads: under tensor parallelism each rank sees only its own heads."""
        T = x.shape[0]
        return (p(x).view(T, -1, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))

    def out(self, attn: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attn.reshape(attn.shape[0], -1))


class SwiGLU(nn.Module):
    """`down(silu(gate(x)) * up(x))`: the dense models' `mlp`, Llama 4's dense layers and shared expert."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Decoder(nn.Module):
    """Embedding, decoder layers, final norm. Unlike HF's, `embed_tokens` has no `padding_idx`: by choice, every row
    (the `pad_token_id` row too) is trained, as in torchtitan and Megatron. Packed batches carry no padding, and
    the pad id is often a real token (eos) that HF would never train; TP also shards this table by vocab rows.

    Layers live in a ModuleDict keyed by their index, so a pipeline stage holds some of them under the same names;
    a stage without the embedding takes hidden states (floating point) in place of token ids, one without the final
    norm returns its last layer's output. A layer returns `x`, or `(x, aux)` where it has statistics to report
    (router logits), which the decoder returns in layer order."""

    layer_class: type[nn.Module]

    def __init__(self, config, layers: Sequence[int] | None = None, embed: bool = True, norm: bool = True):
        super().__init__()
        self.config = config
        layers = range(config.num_hidden_layers) if layers is None else layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if embed else None
        self.layers = nn.ModuleDict({str(i): self.layer_class(config, i) for i in layers})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if norm else None
        self.rotary_emb = self.rotary_class(config)

    rotary_class: type[RotaryEmbedding] = RotaryEmbedding

    def layer_inputs(self, x, position_ids, cu_seqlens, max_seqlen) -> tuple:
        """What every layer takes after `x` (RoPE angles, sequence bounds), built once per forward. Each family's
        decoder defines it (its RoPE form differs); reached only by a family that left it out."""
        # The base's contract, not a stub: every family defines it; `test_protocol` checks this message.
        raise NotImplementedError(f"{type(self).__name__} must define layer_inputs (see blocks.Decoder)")

    def forward(self, x, position_ids, cu_seqlens, max_seqlen) -> tuple[torch.Tensor, list]:
        """`(hidden states [T, H], the layers' aux outputs)`."""
        if not x.is_floating_point():
            x = self.embed_tokens(x)
        inputs = self.layer_inputs(x, position_ids, cu_seqlens, max_seqlen)
        aux = []
        for layer in self.layers.values():
            x = layer(x, *inputs)
            if isinstance(x, tuple):
                x, a = x
                if a is not None:
                    aux.append(a)
        return (self.norm(x) if self.norm is not None else x), aux


class LogprobsHead(nn.Module):
    """Per-token log-probs and entropy of `labels` from hidden states, or with `loss` the fused scalar loss (SFT /
    pretraining cross-entropy, gradients made in forward: `dtllama.ops.linear_cross_entropy`); no parameters of its
    own (the weight is passed in). Its own module so that context parallelism can hand it the labels of its token
    shard. `save_bytes`: memory for logit rows kept from forward to backward instead of recomputed (see
    `dtllama.ops.linear_logprobs_entropy`); lower it to trade speed for memory."""

    def __init__(self, save_bytes: int = SAVE_BYTES):
        super().__init__()
        self.save_bytes = save_bytes

    def forward(self, hidden, weight, labels, temperature, chunk_size: int, save_bytes: int | None = None,
                entropy: bool = True, loss: CrossEntropy | None = None):
        # prepare_batch already validated the labels
        if loss is not None:
            return linear_cross_entropy(hidden, weight, labels, loss, check=False)
        return linear_logprobs_entropy(hidden, weight, labels, temperature, chunk_size, check=False,
                                       save_bytes=self.save_bytes if save_bytes is None else save_bytes,
                                       entropy=entropy)


class TokenSum(nn.Module):
    """The identity: a hook point where a per-rank statistic of this rank's tokens is summed over the ranks holding
    the other tokens of the same sequences (TP's sequence parallel, Ulysses CP register the sums)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass
class CausalLMOutput:
    """Packed `[T, ...]` or, for padded input, `[B, S, ...]` (zeros at padding)."""

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None  # with `loss=`: the fused cross-entropy, a 0-d fp32 tensor
    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None  # `[..., k]` with `top_k`: the k most likely tokens' log-probs
    topk_indices: torch.Tensor | None = None  # `[..., k]`: their vocab ids


@dataclass
class ValueOutput:
    values: torch.Tensor


class AddLossGradient(torch.autograd.Function):
    """Identity on `x` whose backward also starts `loss`'s (gradient 1): an auxiliary loss computed inside a pipeline
    stage reaches its parameters without passing through the schedule's loss (Megatron's MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.new_ones(ctx.loss_shape, dtype=ctx.loss_dtype)


@dataclass(frozen=True)
class StageIO:
    """What a pipeline stage's forward needs beyond its inputs: the causal-LM head's temperature, chunk size and
    memory for kept logit rows (None: the head's default), and the weight of each microbatch's auxiliary loss (an
    MoE's load balance), which a stage adds to the backward itself since the schedule's loss sees only the head."""

    temperature: float = 1.0
    chunk_size: int = 1024
    save_bytes: int | None = None
    aux_loss_scale: float = 1.0
    entropy: bool = True


class PretrainedModel(nn.Module):
    """Base of every family's models: a decoder (`model`) and a head, HF names throughout.

    `layers`, `first`, `last` build part of the model (a pipeline stage: some layers, the embedding if first, the
    final norm and head if last; see `cut`); `stage` makes the forward a pipeline stage's. A subclass sets
    `decoder_class`, builds its head in `_build_head` and declares its head's TP style in `head_plan`."""

    decoder_class: type[Decoder]
    casts_at_use = False  # whether every module casts its parameters at use (see `protocol.ModelPlan`)
    output = "logprobs"

    def __init__(self, config, *, layers: Sequence[int] | None = None, first: bool = True, last: bool = True,
                 stage: StageIO | None = None):
        super().__init__()
        self.config, self.stage = config, stage
        tied_copy = last and self.output == "logprobs" and config.tie_word_embeddings  # the head reads the table
        self.model = self.decoder_class(config, layers, embed=first or tied_copy, norm=last)
        self._build_head(last)

    def _build_head(self, last: bool) -> None:
        """The head modules (`CausalLM`, `ValueModel` define them); reached only by a model class deriving from
        `PretrainedModel` directly instead of from one of those two."""
        # The base's contract, not a stub: CausalLM and ValueModel define it; `test_protocol` checks this message.
        raise NotImplementedError(f"{type(self).__name__} must derive from CausalLM or ValueModel (or build a head)")

    def head_plan(self) -> dict[str, P.Style]:
        return {}

    def plan(self) -> P.ModelPlan:
        """The model protocol's view of this model (or stage): see `dtllama.models.protocol`."""
        tp: dict[str, P.Style] = {}
        if self.model.embed_tokens is not None:
            tp["model.embed_tokens"] = P.VocabEmbedding()
        if self.model.norm is not None:
            tp["model.norm"] = P.TokenShardedNorm()
            tp.update(self.head_plan())
        tied = self.output == "logprobs" and self.config.tie_word_embeddings
        return P.ModelPlan(tp, output=self.output, token_sums=self.token_sums, casts_at_use=self.casts_at_use,
                           tied=tied)

    token_sums: tuple[str, ...] = ()

    def layer_plan(self, layer: nn.Module) -> P.LayerPlan:
        """The model protocol's view of one of its decoder layers: the layer's own plan (`layer.plan()`)."""
        return layer.plan()

    def cut(self, layers: Sequence[int], first: bool, last: bool, stage: StageIO | None = None) -> "PretrainedModel":
        """A model of the same class holding `layers` (and the embedding if `first`, the norm and head if `last`)
        whose modules are this model's own objects: parameters are shared and names stay HF's. Call on the meta
        device, before any parallelism."""
        with torch.device("meta"):
            part = type(self)(self.config, layers=layers, first=first, last=last, stage=stage)
        for name, _ in list(part.named_children()):
            if name != "model":
                setattr(part, name, getattr(self, name))
        for name, child in list(part.model.named_children()):
            if name == "layers":
                for k in list(child):
                    child[k] = self.model.layers[k]
            else:
                setattr(part.model, name, getattr(self.model, name))
        return part

    @torch.no_grad()
    def init_weights(self, seed: int = 0, names: set[str] | None = None) -> None:
        """Random init as HF does (normal(0, initializer_range), norms 1, biases 0).

        Each parameter draws from its own generator seeded by `(seed, name)` and every rank copies
        its own slice of that full tensor, so the values do not depend on the later sharding.
        `names` limits the init to those parameters (e.g. a value head missing from a checkpoint).
        """
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            name = hf_name(name)
            if names is not None and name not in names:
                continue
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if name.endswith("norm.weight"):
                full = torch.ones(p.shape)
            elif name.endswith(".bias"):
                full = torch.zeros(p.shape)
            else:
                full = torch.empty(p.shape).normal_(0.0, std, generator=g)
            copy_full_into(p, full)
        self.reset_buffers()
        for block in balanced_blocks(self):
            block.reset_balance(bias=True)

    def reset_buffers(self) -> None:
        """Recompute the buffers derived from the config (RoPE), zero the MoE balancing counts; after any load."""
        self.model.rotary_emb.reset_parameters()
        for block in balanced_blocks(self):
            block.reset_balance(bias=False)

    def balanced_moe(self) -> list:
        """The MoE blocks this model (or stage) holds that balance by bias (`moe.MoEBlock`: `tokens_per_expert`,
        `update_bias`), in layer order; the parallel layer sums their counts over ranks after each step."""
        return balanced_blocks(self)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = torch.float32):
        """Load an HF folder on the host (parallel training loads into a meta-built model: `load_state_into`)."""
        from dtllama.models.hf_io import load_pretrained

        return load_pretrained(cls, path, dtype=dtype)

    def save_pretrained(self, path, dtype: torch.dtype | None = None, max_shard_bytes: int = 2**31,
                        source: str | None = None) -> None:
        """Write an HF folder from any layout (`source`: a folder whose tokenizer files to copy along)."""
        from dtllama.models.hf_io import save_pretrained

        save_pretrained(self, path, dtype=dtype, max_shard_bytes=max_shard_bytes, source=source)

    def hidden_states(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None) -> torch.Tensor:
        """The final normed hidden states `[T, hidden]` of a packed batch, validated as the forward validates it:
        for a trainer that applies its own loss head (the torchtitan integration)."""
        return self._decode(input_ids, position_ids, cu_seqlens, max_seqlen, None, None)[0]

    def check_media(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, media: dict) -> None:
        """Refuse images and videos (`MEDIA`) for a model without a vision tower; a vision-language
        model checks them against its image tokens. The batch check runs it on every rank before any collective."""
        given = sorted(k for k, v in media.items() if v is not None)
        if given:
            raise ValueError(f"{type(self).__name__} has no vision tower: drop {given}, or load a vision-language "
                             "model (Qwen2.5-VL) through the Hugging Face adapter (dtllama.models.hf)")

    def _decode(self, input_ids, position_ids, cu_seqlens, max_seqlen, labels, attention_mask, media=None):
        """Validate (and pack a padded batch), then run the decoder: `(hidden [T, H], aux, the packed batch)`."""
        batch = prepare_batch(input_ids, self.config.vocab_size, position_ids, cu_seqlens, max_seqlen, labels,
                              attention_mask)
        self.check_media(batch.input_ids, batch.cu_seqlens, media or {})
        h, aux = self.model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        return h, aux, batch

    def _stage_decode(self, x, position_ids, cu_seqlens, num_seqs, max_seqlen):
        """A pipeline stage's decoder run: `cu_seqlens` is padded with repeats of T to one length, `num_seqs` real.
        Its layers' auxiliary loss (`stage_aux_loss`), if any, joins the backward through the hidden states."""
        h, aux = self.model(x, position_ids, cu_seqlens[: int(num_seqs) + 1], int(max_seqlen))
        loss = self.stage_aux_loss(aux) if aux else None
        return (h if loss is None else AddLossGradient.apply(h, loss * self.stage.aux_loss_scale)), aux

    def stage_aux_loss(self, aux: list) -> torch.Tensor | None:
        """This stage's share of the model's auxiliary loss from its layers' aux outputs (none by default)."""
        return None


class CausalLM(PretrainedModel):
    """Causal LM. With tied embeddings there is no `lm_head` module: the head reads `model.embed_tokens.weight`,
    and checkpoints carry it once, as HF's do."""

    hf_architecture = "ForCausalLM"
    output_class = CausalLMOutput

    def _build_head(self, last: bool) -> None:
        untied = last and not self.config.tie_word_embeddings
        self.lm_head = Linear(self.config.hidden_size, self.config.vocab_size, bias=False) if untied else None
        self.logprobs_head = LogprobsHead() if last else None

    def head_plan(self) -> dict[str, P.Style]:
        # Only its weight is used (by the head op), so the style just places it: vocab rows sharded.
        return {"lm_head": P.VocabHead()} if self.lm_head is not None else {}

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def aux_outputs(self, aux: list) -> dict:
        """Fields the family adds to its output from the layers' aux outputs (none for a dense model)."""
        return {}

    def head(self, h, labels, temperature, chunk_size: int, save_bytes: int | None = None, entropy: bool = True,
             loss: CrossEntropy | None = None):
        """Full-vocabulary logits (no labels), `(log-probs, entropy)` of `labels`, or with `loss` the fused loss of
        `labels`; never `[T, vocab]` for those. The weight is cast to the activations' dtype at use (fp32 parameters
        under one-rank mixed precision)."""
        weight = self.output_weight.to(h.dtype)
        if labels is None:
            return linear_logits(h, weight, temperature)
        if loss is not None and (isinstance(temperature, torch.Tensor) or temperature != 1.0):
            raise ValueError(f"loss= is the cross-entropy at temperature 1; got temperature={temperature!r}: drop one")
        return self.logprobs_head(h, weight, labels, temperature, chunk_size, save_bytes, entropy, loss)

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None, labels=None,
                attention_mask=None, temperature: float | torch.Tensor = 1.0, chunk_size: int = 1024,
                save_bytes: int | None = None, num_seqs=None, top_k: int | None = None, entropy: bool = True,
                loss: CrossEntropy | None = None, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                video_grid_thw=None, second_per_grid_ts=None):
        """Logits, or, given `labels`, per-token log-probs and entropy without full-vocab logits.

        `temperature`: one for the batch, or a tensor of one per sequence `[B]` (of `cu_seqlens`, or the rows of a
        padded batch), as a rollout samples each request at its own; each sequence's tokens then read theirs.
        `top_k`: also the log-probs and vocab ids of every position's k most likely tokens (`topk_logprobs`,
        `topk_indices`: distillation, a KL on the top-k), without `[T, vocab]` logits. `entropy=False`: no entropy
        (`entropy` is None), its work skipped; the log-probs and their gradients are the same bits. `loss`
        (`dtllama.ops.CrossEntropy`, with `labels`): the SFT / pretraining loss instead of per-token outputs
        (`loss`, a 0-d tensor; its gradients are made in forward, so backward is cheap and logits are never kept).

        `labels[t]` is the token whose log-prob is read at position t (already shifted: see
        `dtllama.ops.shift_labels`); `-100` marks positions to ignore (their outputs are 0). `save_bytes`: memory
        for logit rows kept from forward to backward (None: `LogprobsHead`'s 2 GiB; 0 recomputes them all). A
        pipeline stage (`stage` set) takes token ids or hidden states and a microbatch's `num_seqs`, and returns
        tensors. `pixel_values`, `image_grid_thw` (and `pixel_values_videos`, `video_grid_thw`,
        `second_per_grid_ts`): the batch's images (videos), in the order of their tokens, for a vision-language model
        (Qwen2.5-VL through `dtllama.models.hf`), as its processor makes them.
        """
        if self.stage is not None:
            h, _ = self._stage_decode(input_ids, position_ids, cu_seqlens, num_seqs, max_seqlen)
            io = self.stage
            if self.model.norm is None:
                return h
            return self.head(h, labels, io.temperature, io.chunk_size, io.save_bytes, io.entropy)
        media = dict(zip(MEDIA, (pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                 second_per_grid_ts)))
        h, aux, batch = self._decode(input_ids, position_ids, cu_seqlens, max_seqlen, labels, attention_mask, media)
        extra = self.aux_outputs(aux)
        temperature = token_temperatures(temperature, batch.cu_seqlens)
        if top_k is not None:
            values, ids = linear_topk_logprobs(h, self.output_weight.to(h.dtype), top_k, temperature, chunk_size)
            extra.update(topk_logprobs=batch.repad(values), topk_indices=batch.repad(ids))
        if batch.labels is None:
            return self.output_class(logits=batch.repad(self.head(h, None, temperature, chunk_size)), **extra)
        if loss is not None:
            if batch.labels is None:
                raise ValueError("loss= needs labels (the next tokens, -100 where no loss is taken)")
            return self.output_class(loss=self.head(h, batch.labels, temperature, chunk_size, loss=loss), **extra)
        lp, ent = self.head(h, batch.labels, temperature, chunk_size, save_bytes, entropy)
        return self.output_class(logprobs=batch.repad(lp), entropy=None if ent is None else batch.repad(ent), **extra)


def token_temperatures(temperature, cu_seqlens: torch.Tensor):
    """A per-sequence temperature tensor `[B]` as one per token `[T]` (each sequence's tokens its own); a float as
    is. The error names the shapes a tensor may have."""
    if not isinstance(temperature, torch.Tensor):
        return temperature
    cu = cu_seqlens.long()
    n, T = cu.numel() - 1, int(cu[-1])
    if temperature.shape != (n,):
        raise ValueError(f"temperature of shape {tuple(temperature.shape)}: pass a float or one per sequence [{n}] "
                         "(the sequences of cu_seqlens, or the rows of a padded batch)")
    return torch.repeat_interleave(temperature.float().to(cu.device), cu[1:] - cu[:-1], output_size=T)


class ValueModel(PretrainedModel):
    """Critic: one scalar per token from `score`, laid out as HF's `*ForSequenceClassification` head with
    `num_labels=1` (`score.weight`), or as its `*ForTokenClassification` head (`score.weight` and `score.bias`,
    how verl saves critics) when the config's `architectures` names that one; exports keep the layout."""

    output = "values"

    def _build_head(self, last: bool) -> None:
        self.score = Linear(self.config.hidden_size, 1, bias=self.config.score_bias) if last else None

    def head_plan(self) -> dict[str, P.Style]:
        return {"score": P.ReplicatedHead()}

    @property
    def hf_architecture(self) -> str:
        return self.config.value_head

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None, attention_mask=None,
                num_seqs=None, labels=None):
        """Values of every token; a pipeline stage (`stage` set) as the causal LM's, its microbatch's labels unused."""
        if self.stage is not None:
            h, _ = self._stage_decode(input_ids, position_ids, cu_seqlens, num_seqs, max_seqlen)
            return h if self.model.norm is None else self.score(h).squeeze(-1).float()
        h, _, batch = self._decode(input_ids, position_ids, cu_seqlens, max_seqlen, None, attention_mask)
        return ValueOutput(values=batch.repad(self.score(h).squeeze(-1).float()))


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's slice of the unsharded `full` into `param` (a plain tensor or a DTensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        shape, offset = local_shape_and_offset(param)
        local = param.to_local()
        if local.numel():
            local.copy_(full[tuple(slice(o, o + s) for o, s in zip(offset, shape))])
    else:
        param.copy_(full)
