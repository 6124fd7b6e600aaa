"""Llama 4 text model (Scout, Maverick) in plain torch modules whose parameter names are exactly Hugging Face's.

As the dense model (`dtllama.models.llama`), it runs packed `[T, hidden]` activations described by `cu_seqlens`, takes a
padded `[B, S]` batch through `prepare_batch`, and keeps decoder layers in a ModuleDict keyed "0".."N-1". What
Llama 4 adds, each checked against transformers' `Llama4ForCausalLM`:

- iRoPE attention: RoPE layers rotate interleaved pairs (complex form) and attend within chunks of
  `attention_chunk_size` tokens of their sequence (varlen attention over a chunked `cu_seqlens`, built once per
  forward), after a weightless L2 norm of q and k when `use_qk_norm`; NoPE layers (`no_rope_layers[i] == 0`)
  attend to the whole sequence and scale q by a position-dependent temperature.
- MoE feed-forward: a sigmoid top-k router; each routed expert takes its token pre-scaled by its score; a shared
  SwiGLU expert is added. Experts run as a loop (the reference) or as one `torch._grouped_mm` over the
  expert-sorted tokens (CUDA bf16). Maverick interleaves dense SwiGLU layers.
- Router statistics (tokens per expert, a load-balance loss) on the output, for the recipe to log or add.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch
from torch import nn

from dtllama.models import protocol as P
from dtllama.models.blocks import Attention, Decoder, RMSNorm, RotaryEmbedding, SwiGLU
from dtllama.models.llama4_config import Llama4Config
from dtllama.models.moe import (  # expert_counts, router_stats, set_moe_backend: re-exported (__all__)
    GroupedExperts, MoEBlock, RouterStats, Routing, expert_counts, router_stats, run_experts, set_moe_backend,
)
from dtllama.models.moe_lm import MoECausalLM, MoECausalLMOutput

# ---------------------------------------------------------------------------------------------------- attention


class Llama4RotaryEmbedding(RotaryEmbedding):
    """Rotations as complex numbers `e^{i * position * inv_freq}` `[T, head_dim/2]`, as HF's `freqs_cis`;
    `inv_freq` (default or llama3 scaling) is the dense model's."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        freqs = self.angles(position_ids)
        return torch.polar(torch.ones_like(freqs), freqs)


def apply_rope_interleaved(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate `x [T, H, D]` by `freqs_cis [T, D/2]` with pairs `(x[2j], x[2j+1])` as complex numbers: Llama 4's
    (and Meta's original) layout, not the dense HF models' halves. Weights are HF's as is, so nothing is permuted."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(-2).type_as(x)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's `Llama4TextL2Norm`: an RMS norm without weight, in fp32."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class AttentionSpans(NamedTuple):
    """What attention needs of one packed batch, built once per forward and shared by every layer."""

    cu_seqlens: torch.Tensor  # whole sequences (NoPE layers)
    max_seqlen: int
    chunk_cu_seqlens: torch.Tensor  # sequences cut into chunks (RoPE layers)
    chunk_max_seqlen: int
    temperature: torch.Tensor | None  # per-token q scale of NoPE layers `[T]`, None without temperature tuning


def chunked_cu_seqlens(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """`cu_seqlens` with a boundary added at every multiple of `chunk_size` inside each sequence: varlen causal
    attention over it is HF's chunked attention (a token sees the earlier tokens of its own chunk). Positions for
    RoPE are unchanged; the offset inside the sequence, not the position id, places the boundaries, as HF's
    padding-aware chunk mask does. Built from `cu_seqlens` alone, so a CP rank, whose positions cover only its
    token shard, builds the same global chunks."""
    cu = cu_seqlens.long()
    chunks = (cu[1:] - cu[:-1] + chunk_size - 1) // chunk_size  # per sequence
    first = torch.repeat_interleave(chunks.cumsum(0) - chunks, chunks)  # each chunk's sequence's first chunk
    k = torch.arange(first.numel(), device=cu.device) - first  # the chunk's index within its sequence
    starts = torch.repeat_interleave(cu[:-1], chunks) + k * chunk_size
    return torch.cat([starts, cu[-1:]]).to(cu_seqlens.dtype)


def temperature_scales(position_ids: torch.Tensor, floor_scale: int, attn_scale: float) -> torch.Tensor:
    """NoPE layers' q scale `1 + attn_scale * log(1 + floor((pos + 1) / floor_scale))` (HF's formula, from
    arXiv:2501.19399): it sharpens attention far into long sequences, where no position signal is left."""
    return torch.log1p(torch.floor((position_ids.float() + 1.0) / floor_scale)) * attn_scale + 1.0


def attention_spans(config: Llama4Config, position_ids, cu_seqlens, max_seqlen: int) -> AttentionSpans:
    chunk = config.attention_chunk_size
    if chunk is None:
        chunk_cu, chunk_max = cu_seqlens, max_seqlen
    else:
        chunk_cu, chunk_max = chunked_cu_seqlens(cu_seqlens, chunk), min(max_seqlen, chunk)
    temp = (temperature_scales(position_ids, config.floor_scale, config.attn_scale)
            if config.attn_temperature_tuning else None)
    return AttentionSpans(cu_seqlens, max_seqlen, chunk_cu, chunk_max, temp)


class Llama4TextAttention(Attention):
    def __init__(self, config: Llama4Config, layer: int):
        super().__init__(config, qkv_bias=config.attention_bias, o_bias=config.attention_bias)
        self.use_rope = config.use_rope(layer)
        # HF gives only RoPE layers the q/k norm; its eps is rms_norm_eps.
        self.qk_norm_eps = config.rms_norm_eps if config.use_qk_norm and self.use_rope else None

    def forward(self, x, freqs_cis, spans: AttentionSpans):
        q, k, v = self.qkv(x)
        if self.use_rope:
            q, k = apply_rope_interleaved(q, freqs_cis), apply_rope_interleaved(k, freqs_cis)
            if self.qk_norm_eps is not None:  # after RoPE, as HF
                q, k = l2_norm(q, self.qk_norm_eps), l2_norm(k, self.qk_norm_eps)
            out = self.attn_core(q, k, v, spans.chunk_cu_seqlens, spans.chunk_max_seqlen)
        else:
            if spans.temperature is not None:
                q = (q * spans.temperature[:, None, None]).to(q.dtype)
            out = self.attn_core(q, k, v, spans.cu_seqlens, spans.max_seqlen)
        return self.out(out)


# ---------------------------------------------------------------------------------------------------- feed-forward


class Llama4TextExperts(GroupedExperts):
    """All routed experts' SwiGLU weights stacked as HF stores them: `gate_up_proj [E, H, 2I]` (gate first, then
    up, along the last dim) and `down_proj [E, I, H]`, applied as `x @ W` (no transposes)."""

    def __init__(self, config: Llama4Config):
        super().__init__(config.num_local_experts, config.hidden_size, config.intermediate_size, transposed=False)


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(experts [T, k], scores [T, k])`: the top-k experts by router logit and their scores `sigmoid(logit)`,
    computed in fp32 as HF's `Llama4Router` does (its other experts get sigmoid(-inf) = 0, i.e. nothing)."""
    top, experts = torch.topk(logits, top_k, dim=1)
    return experts, torch.sigmoid(top.float()).to(logits.dtype)


class Llama4TextMoe(MoEBlock):
    """Token-choice MoE. HF runs every expert on every token (scaled by a score of 0 where unrouted); this runs
    each expert on its own tokens only, which is the same sum: an expert's SwiGLU of a zero row is zero. With
    `load_balance_coeff`, the top-k is chosen by `sigmoid(logit) + bias` (`moe.MoEBlock`)."""

    def __init__(self, config: Llama4Config):
        super().__init__(config.num_local_experts, config.num_experts_per_tok, config.load_balance_coeff)
        self.experts = Llama4TextExperts(config)
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.shared_expert = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """`(output [T, H], the routing)`."""
        logits = self.router(x)
        if self.expert_bias is None:
            experts, scores = route(logits, self.top_k)
        else:
            experts = self.select(torch.sigmoid(logits.float()))
            scores = torch.sigmoid(logits.gather(1, experts).float()).to(logits.dtype)
        out = self.shared_expert(x) + run_experts(x, self.experts, experts, scores, scale_inputs=True)
        return out, Routing(logits, experts)


# ---------------------------------------------------------------------------------------------------- model


class Llama4TextDecoderLayer(nn.Module):
    def __init__(self, config: Llama4Config, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Llama4TextAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe(layer)
        self.feed_forward = (Llama4TextMoe(config) if self.is_moe
                             else SwiGLU(config.hidden_size, config.intermediate_size_mlp))

    def plan(self) -> P.LayerPlan:
        attention = P.attention_plan(3)  # (x, freqs_cis, spans)
        if not self.is_moe:
            return P.LayerPlan({**attention, **P.swiglu_plan("feed_forward")})
        # The router and routed experts work on this rank's own tokens (the experts are sharded by EP, never TP).
        tp = {**attention, "feed_forward": P.OwnTokens(), "feed_forward.router": P.Router(),
              **P.swiglu_plan("feed_forward.shared_expert")}
        parts = ("input_layernorm", "self_attn", "post_attention_layernorm", "feed_forward.shared_expert")
        return P.LayerPlan(tp, experts="feed_forward.experts", compile_parts=parts)

    def forward(self, x, freqs_cis, spans: AttentionSpans):
        """`(x, the MoE's routing or None for a dense layer)`."""
        x = x + self.self_attn(self.input_layernorm(x), freqs_cis, spans)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            h, routing = self.feed_forward(h)
            return x + h, routing
        return x + self.feed_forward(h), None


class Llama4TextModel(Decoder):
    """Embedding (without `padding_idx`, as `blocks.Decoder` explains), decoder layers, final norm; the layers'
    aux outputs are the MoE layers' router logits."""

    layer_class = Llama4TextDecoderLayer
    rotary_class = Llama4RotaryEmbedding

    def layer_inputs(self, x, position_ids, cu_seqlens, max_seqlen):
        return self.rotary_emb(position_ids), attention_spans(self.config, position_ids, cu_seqlens, max_seqlen)


Llama4CausalLMOutput = MoECausalLMOutput


class Llama4ForCausalLM(MoECausalLM):
    """Causal LM with HF's `Llama4ForCausalLM` parameter names; its output adds `router_stats` (`MoECausalLM`)."""

    config_class = Llama4Config  # what `hf_io` reads config.json with
    decoder_class = Llama4TextModel

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = torch.float32) -> "Llama4ForCausalLM":
        """Load a transformers-saved `Llama4ForCausalLM` folder, or the text model of a multimodal
        (`Llama4ForConditionalGeneration`) one, whose tensors are the same names under `language_model.`."""
        from dtllama.models.hf_io import load_state_into

        path = os.fspath(path)
        config = Llama4Config.from_hf(path)
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")
        if dtype is not None:
            model.to(dtype)
        load_state_into(_MultimodalView(model) if _is_multimodal(path) else model, path)
        return model


class _MultimodalView(nn.Module):
    """The text model as a multimodal checkpoint names it: its own state-dict keys under `language_model.` (a
    prefix, not a key map); the checkpoint's vision tensors are simply not read."""

    def __init__(self, model: Llama4ForCausalLM):
        super().__init__()
        self.language_model = model

    def reset_buffers(self) -> None:
        self.language_model.reset_buffers()


def _is_multimodal(path: str) -> bool:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f).get("model_type") == "llama4"


__all__ = ["Llama4CausalLMOutput", "Llama4Config", "Llama4ForCausalLM", "RouterStats", "expert_counts", "router_stats",
           "set_moe_backend"]
