"""Llama-family decoder in plain torch modules whose parameter names are exactly Hugging Face's.

Activations are packed `[T, hidden]` (no batch dimension): the model runs on padding-free batches
described by `cu_seqlens`. Module boundaries that parallelism needs are explicit: each attention
calls `self_attn.attn_core` (the callable Ulysses wraps), and decoder layers live in a ModuleDict
keyed "0".."N-1" so a pipeline stage can drop layers without renaming the rest.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dtllama.ops import IGNORE_INDEX, check_packed, linear_logits, linear_logprobs_entropy, pack
from dtllama.ops import position_ids_from_cu_seqlens
from dtllama.ops import rms_norm, unpack, varlen_attention

from .config import ModelConfig


def hf_name(name: str) -> str:
    """A parameter's HF name: without the prefixes wrappers add (activation checkpointing, compile)."""
    return name.replace("._checkpoint_wrapped_module", "").replace("._orig_mod", "")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


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
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.head_dim = d
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=config.o_bias)
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
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

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
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict({str(i): LlamaDecoderLayer(config) for i in range(config.num_hidden_layers)})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen):
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        for layer in self.layers.values():
            x = layer(x, cos, sin, cu_seqlens, max_seqlen)
        return self.norm(x)


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

    def _hidden(self, input_ids, position_ids, cu_seqlens, max_seqlen, labels, attention_mask):
        """Run the decoder on packed tokens; returns hidden `[T, H]`, packed labels and how to re-pad."""
        padded = None
        if input_ids.dim() == 2:
            B, S = input_ids.shape
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens is for packed [T] input; a [B, S] batch takes attention_mask")
            p = pack(input_ids, attention_mask, position_ids, labels)
            input_ids, position_ids, cu_seqlens, max_seqlen, labels = (
                p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, p.labels,
            )
            padded = (p.indices, B, S)
        elif input_ids.dim() == 1:
            if attention_mask is not None:
                raise ValueError("attention_mask is for a padded [B, S] batch; packed [T] input takes cu_seqlens")
            if cu_seqlens is None:
                raise ValueError("packed [T] input_ids need cu_seqlens (see dtllama.ops.pack)")
        else:
            raise ValueError(f"input_ids must be [T] (packed) or [B, S] (padded), got shape {tuple(input_ids.shape)}")
        if not torch.compiler.is_compiling():
            check_packed(input_ids, position_ids, cu_seqlens, max_seqlen, self.config.vocab_size, labels)
        if position_ids is None:
            position_ids = position_ids_from_cu_seqlens(cu_seqlens, input_ids.shape[0])
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        h = self.model(input_ids, position_ids, cu_seqlens, max_seqlen)
        return h, labels, padded

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
    def from_pretrained(cls, path, device="cpu", dtype: torch.dtype | None = torch.float32):
        from .hf_io import load_pretrained

        return load_pretrained(cls, path, device=device, dtype=dtype)

    def save_pretrained(self, path, dtype: torch.dtype | None = None, max_shard_bytes: int = 2**31,
                        source: str | None = None) -> None:
        """Write an HF folder (`source`: a folder whose tokenizer files to copy along)."""
        from .hf_io import save_pretrained

        save_pretrained(self, path, dtype=dtype, max_shard_bytes=max_shard_bytes, source=source)


class LlamaForCausalLM(_LlamaBase):
    """Causal LM. With tied embeddings there is no `lm_head` module: the head reads
    `model.embed_tokens.weight`, and checkpoints carry it once, as HF's do."""

    hf_architecture = "ForCausalLM"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

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
        h, labels, padded = self._hidden(input_ids, position_ids, cu_seqlens, max_seqlen, labels, attention_mask)
        if labels is None:
            out = CausalLMOutput(logits=linear_logits(h, self.output_weight, temperature))
        else:
            # check_packed already validated the labels
            lp, ent = linear_logprobs_entropy(h, self.output_weight, labels, temperature, chunk_size, check=False)
            out = CausalLMOutput(logprobs=lp, entropy=ent)
        if padded is not None:
            for k in ("logits", "logprobs", "entropy"):
                if getattr(out, k) is not None:
                    setattr(out, k, unpack(getattr(out, k), *padded))
        return out


class LlamaForValue(_LlamaBase):
    """Critic: one scalar per token from `score` (HF's sequence-classification head, `num_labels=1`)."""

    hf_architecture = "ForSequenceClassification"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None, attention_mask=None) -> ValueOutput:
        h, _, padded = self._hidden(input_ids, position_ids, cu_seqlens, max_seqlen, None, attention_mask)
        values = self.score(h).squeeze(-1).float()
        return ValueOutput(values=values if padded is None else unpack(values, *padded))


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's slice of the unsharded `full` into `param` (a plain tensor or a DTensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
        local = param.to_local()
        if local.numel():
            local.copy_(full[tuple(slice(o, o + s) for o, s in zip(offset, shape))])
    else:
        param.copy_(full)


__all__ = ["CausalLMOutput", "IGNORE_INDEX", "LlamaForCausalLM", "LlamaForValue", "ValueOutput"]
