"""The dense Llama family (Llama 2/3/3.1/3.2, Qwen2/2.5, Mistral without sliding window): what differs from the
shared blocks is RoPE by halves, Qwen2's q/k/v bias, and the SwiGLU `mlp` of every layer.

Activations are packed `[T, hidden]` (no batch dimension): the model runs on padding-free batches described by
`cu_seqlens`. Every module casts its parameters at use, so one-rank mixed precision needs no FSDP.
"""

from __future__ import annotations

import torch
from torch import nn

from dtllama.models import protocol as P
from dtllama.models.blocks import (
    Attention, CausalLM, CausalLMOutput, Decoder, RMSNorm, RotaryEmbedding, SwiGLU, ValueModel, ValueOutput,
    copy_full_into, hf_name,
)
from dtllama.models.config import ModelConfig
from dtllama.ops import IGNORE_INDEX


class LlamaRotaryEmbedding(RotaryEmbedding):
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        emb = torch.cat((self.angles(position_ids),) * 2, dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class LlamaAttention(Attention):
    def __init__(self, config: ModelConfig):
        super().__init__(config, qkv_bias=config.qkv_bias, o_bias=config.o_bias)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        q, k, v = self.qkv(x)
        q, k = apply_rope(q, k, cos, sin)
        return self.out(self.attn_core(q, k, v, cu_seqlens, max_seqlen))


class LlamaDecoderLayer(nn.Module):
    attention_class = LlamaAttention

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self.attention_class(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def plan(self) -> P.LayerPlan:
        return P.LayerPlan({**P.attention_plan(5), **P.swiglu_plan("mlp")})  # (x, cos, sin, cu_seqlens, max)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(Decoder):
    layer_class = LlamaDecoderLayer
    rotary_class = LlamaRotaryEmbedding

    def layer_inputs(self, x, position_ids, cu_seqlens, max_seqlen):
        return (*self.rotary_emb(position_ids, x.dtype), cu_seqlens, max_seqlen)


class LlamaForCausalLM(CausalLM):
    decoder_class = LlamaModel
    casts_at_use = True


class LlamaForValue(ValueModel):
    decoder_class = LlamaModel
    casts_at_use = True


__all__ = ["CausalLMOutput", "IGNORE_INDEX", "LlamaForCausalLM", "LlamaForValue", "ModelConfig", "ValueOutput",
           "copy_full_into", "hf_name"]
