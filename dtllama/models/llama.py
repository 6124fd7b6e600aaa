"""Llama-family decoder in plain torch modules whose parameter names are exactly Hugging Face's.

Activations are packed `[T, hidden]` (no batch dimension): the model runs on padding-free batches
described by `cu_seqlens`. Module boundaries that parallelism needs are explicit: each attention
calls `self_attn.attn_core` (the callable Ulysses wraps), the causal-LM head's log-probs go through
`logprobs_head` (where context parallelism slices the labels), and decoder layers live in a ModuleDict
keyed "0".."N-1" so a pipeline stage can drop layers without renaming the rest (`LlamaModel` runs without its
embedding or final norm when a stage lacks them).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dtllama.ops import IGNORE_INDEX, linear_logits, linear_logprobs_entropy, prepare_batch, rms_norm, varlen_attention
from dtllama.ops.dtensor_utils import local_shape_and_offset
from dtllama.ops.logprobs import SAVE_BYTES

from dtllama.models.config import ModelConfig


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


def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
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
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def reset_parameters(self):
        """Recompute the buffer after `to_empty` (it is not part of any checkpoint)."""
        self.inv_freq = rope_inv_freq(self.config, self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        freqs = position_ids.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class AttentionCore(nn.Module):
    """Packed causal attention `[T, H, D]`; its own module so context parallelism can wrap it."""

    def forward(self, q, k, v, cu_seqlens, max_seqlen):
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.head_dim = d
        self.q_proj = Linear(h, config.num_attention_heads * d, bias=config.qkv_bias)
        self.k_proj = Linear(h, config.num_key_value_heads * d, bias=config.qkv_bias)
        self.v_proj = Linear(h, config.num_key_value_heads * d, bias=config.qkv_bias)
        self.o_proj = Linear(config.num_attention_heads * d, h, bias=config.o_bias)
        self.attn_core = AttentionCore()

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        T = x.shape[0]
        # -1 heads: under tensor parallelism each rank sees only its own heads.
        q = self.q_proj(x).view(T, -1, self.head_dim)
        k = self.k_proj(x).view(T, -1, self.head_dim)
        v = self.v_proj(x).view(T, -1, self.head_dim)
        q, k = apply_rope(q, k, cos, sin)
        out = self.attn_core(q, k, v, cu_seqlens, max_seqlen)
        return self.o_proj(out.reshape(T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, i, bias=b)
        self.up_proj = Linear(h, i, bias=b)
        self.down_proj = Linear(i, h, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm. Unlike HF's, `embed_tokens` has no `padding_idx`: by choice, every row
    (the `pad_token_id` row too) is trained, as in torchtitan and Megatron. Packed batches carry no padding, and
    the pad id is often a real token (eos) that HF would never train; TP also shards this table by vocab rows.

    `compute_dtype`: the dtype the activations run in from the embedding on, where it differs from the
    parameters' (None: theirs). `dtllama.parallel.apply_mixed_precision` sets it; every module then casts its
    parameters to the activations' dtype at use."""

    compute_dtype: torch.dtype | None = None  # a class default: pipeline stages build their models field by field

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict({str(i): LlamaDecoderLayer(config) for i in range(config.num_hidden_layers)})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen):
        """Token ids to normed hidden states. A pipeline stage without the embedding takes the previous stage's
        hidden states as `input_ids`, and one without the final norm returns its last layer's output."""
        x = self.embed_tokens(input_ids) if self.embed_tokens is not None else input_ids
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        for layer in self.layers.values():
            x = layer(x, cos, sin, cu_seqlens, max_seqlen)
        return self.norm(x) if self.norm is not None else x


class LogprobsHead(nn.Module):
    """Per-token log-probs and entropy of `labels` from hidden states; no parameters of its own (the weight is
    passed in). Its own module so that context parallelism can hand it the labels of its token shard.
    `save_bytes`: memory for logit rows kept from forward to backward instead of recomputed (see
    `dtllama.ops.linear_logprobs_entropy`); lower it to trade speed for memory."""

    def __init__(self, save_bytes: int = SAVE_BYTES):
        super().__init__()
        self.save_bytes = save_bytes

    def forward(self, hidden, weight, labels, temperature: float, chunk_size: int):
        # prepare_batch already validated the labels
        return linear_logprobs_entropy(hidden, weight, labels, temperature, chunk_size, check=False,
                                       save_bytes=self.save_bytes)


@dataclass
class CausalLMOutput:
    """Packed `[T, ...]` or, for padded input, `[B, S, ...]` (zeros at padding)."""

    logits: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


@dataclass
class ValueOutput:
    values: torch.Tensor


class _LlamaBase(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)

    def _decode(self, input_ids, position_ids, cu_seqlens, max_seqlen, labels, attention_mask):
        """Validate (and pack a padded batch), then run the decoder: `(hidden [T, H], the packed batch)`."""
        batch = prepare_batch(input_ids, self.config.vocab_size, position_ids, cu_seqlens, max_seqlen, labels,
                              attention_mask)
        return self.model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen), batch

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

    def reset_buffers(self) -> None:
        self.model.rotary_emb.reset_parameters()

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = torch.float32):
        """Load an HF folder on the host (parallel training loads into a meta-built model: `load_state_into`)."""
        from dtllama.models.hf_io import load_pretrained

        return load_pretrained(cls, path, dtype=dtype)

    def save_pretrained(self, path, dtype: torch.dtype | None = None, max_shard_bytes: int = 2**31,
                        source: str | None = None) -> None:
        """Write an HF folder (`source`: a folder whose tokenizer files to copy along)."""
        from dtllama.models.hf_io import save_pretrained

        save_pretrained(self, path, dtype=dtype, max_shard_bytes=max_shard_bytes, source=source)


class LlamaForCausalLM(_LlamaBase):
    """Causal LM. With tied embeddings there is no `lm_head` module: the head reads
    `model.embed_tokens.weight`, and checkpoints carry it once, as HF's do."""

    hf_architecture = "ForCausalLM"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logprobs_head = LogprobsHead()

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None, labels=None,
        attention_mask=None, temperature: float = 1.0, chunk_size: int = 1024,
    ) -> CausalLMOutput:
        """Logits, or, given `labels`, per-token log-probs and entropy without full-vocab logits.

        `labels[t]` is the token whose log-prob is read at position t (already shifted: see
        `dtllama.ops.shift_labels`); `-100` marks positions to ignore (their outputs are 0).
        """
        h, batch = self._decode(input_ids, position_ids, cu_seqlens, max_seqlen, labels, attention_mask)
        if batch.labels is None:
            return CausalLMOutput(logits=batch.repad(linear_logits(h, self.output_weight.to(h.dtype), temperature)))
        lp, ent = self.logprobs_head(h, self.output_weight.to(h.dtype), batch.labels, temperature, chunk_size)
        return CausalLMOutput(logprobs=batch.repad(lp), entropy=batch.repad(ent))


class LlamaForValue(_LlamaBase):
    """Critic: one scalar per token from `score`, laid out as HF's `*ForSequenceClassification` head with
    `num_labels=1` (`score.weight`), or as its `*ForTokenClassification` head (`score.weight` and `score.bias`,
    how verl saves critics) when the config's `architectures` names that one; exports keep the layout."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.score = Linear(config.hidden_size, 1, bias=config.score_bias)

    @property
    def hf_architecture(self) -> str:
        return self.config.value_head

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None, attention_mask=None) -> ValueOutput:
        h, batch = self._decode(input_ids, position_ids, cu_seqlens, max_seqlen, None, attention_mask)
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


__all__ = ["CausalLMOutput", "IGNORE_INDEX", "LlamaForCausalLM", "LlamaForValue", "ValueOutput"]
