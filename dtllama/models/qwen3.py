"""Qwen3 (dense): the Llama decoder plus a learned RMSNorm over each head of q and k, before RoPE.

The head norms run on `[tokens * heads, head_dim]` rows, so under tensor parallelism each rank normalizes its own
heads with the replicated weight (`protocol.HeadNorm`: its gradient is summed over the TP ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dtllama.models import protocol as P
from dtllama.models.blocks import CausalLM, RMSNorm, ValueModel
from dtllama.models.config import ModelConfig, register_family
from dtllama.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaModel, apply_rope


@dataclass
class Qwen3Config(ModelConfig):
    """HF's `Qwen3Config` fields (those of the dense models; `use_sliding_window` / sliding `layer_types` are
    refused by name, as for Qwen2)."""

    ARCHITECTURES: ClassVar[dict[str, str]] = {"qwen3": "Qwen3"}
    model_type: str = "qwen3"
    rope_theta: float = 1000000.0

    def num_params(self, value_head: bool = False) -> int:
        return super().num_params(value_head) + self.num_hidden_layers * 2 * self.head_dim  # q_norm, k_norm


register_family(Qwen3Config, ("qwen3",))


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: Qwen3Config):
        super().__init__(config)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        q, k, v = self.qkv(x)
        d = self.head_dim
        q, k = self.q_norm(q.reshape(-1, d)).view_as(q), self.k_norm(k.reshape(-1, d)).view_as(k)
        q, k = apply_rope(q, k, cos, sin)
        return self.out(self.attn_core(q, k, v, cu_seqlens, max_seqlen))


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_class = Qwen3Attention

    def plan(self) -> P.LayerPlan:
        base = super().plan()
        return P.LayerPlan({**base.tp, "self_attn.q_norm": P.HeadNorm(), "self_attn.k_norm": P.HeadNorm()})


class Qwen3Model(LlamaModel):
    layer_class = Qwen3DecoderLayer


class Qwen3ForCausalLM(CausalLM):
    decoder_class = Qwen3Model
    casts_at_use = True


class Qwen3ForValue(ValueModel):
    decoder_class = Qwen3Model
    casts_at_use = True


__all__ = ["Qwen3Config", "Qwen3ForCausalLM", "Qwen3ForValue"]
