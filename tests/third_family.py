"""A third model family defined here, in tests, to show that a family plugs into the parallel layer through the
model protocol alone (`dtllama.models.protocol`): no edit under `parallel/`.

It is unlike both built-in families: a parallel block (GPT-J / PaLM style: attention and feed-forward both read one
norm of the residual and are added to it together), with a routed MoE (Llama 4's module, reused) as the
feed-forward of the layers `moe_layers` names and a SwiGLU of `intermediate_size_mlp` elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from dtllama.models import protocol as P
from dtllama.models.blocks import CausalLM, RMSNorm, SwiGLU, ValueModel
from dtllama.models.config import ModelConfig
from dtllama.models.llama import LlamaAttention, LlamaModel
from dtllama.models.llama4 import Llama4TextMoe

FAMILY = "parallel_block"  # the harness key: `model_config({"family": FAMILY, ...})`


@dataclass
class ParallelBlockConfig(ModelConfig):
    intermediate_size_mlp: int = 24  # the dense layers' SwiGLU (`intermediate_size`: each expert's)
    num_local_experts: int = 4
    num_experts_per_tok: int = 2
    moe_layers: list[int] = field(default_factory=lambda: [1])
    load_balance_coeff: float | None = None

    def tp_widths(self) -> dict[str, int]:
        return {"intermediate_size": self.intermediate_size, "intermediate_size_mlp": self.intermediate_size_mlp}


class ParallelBlockLayer(nn.Module):
    def __init__(self, config: ParallelBlockConfig, layer: int = 0):
        super().__init__()
        self.is_moe = layer in config.moe_layers
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.mlp = Llama4TextMoe(config) if self.is_moe else SwiGLU(config.hidden_size, config.intermediate_size_mlp)

    def plan(self) -> P.LayerPlan:
        attention = {k: v for k, v in P.attention_plan(5).items() if k != "post_attention_layernorm"}
        if not self.is_moe:
            return P.LayerPlan({**attention, **P.swiglu_plan("mlp")})
        tp = {**attention, "mlp": P.OwnTokens(), "mlp.router": P.Router(), **P.swiglu_plan("mlp.shared_expert")}
        return P.LayerPlan(tp, experts="mlp.experts", compile_parts=("input_layernorm", "self_attn", "mlp.shared_expert"))

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        h = self.input_layernorm(x)
        ff = self.mlp(h)
        ff, logits = ff if self.is_moe else (ff, None)
        return x + self.self_attn(h, cos, sin, cu_seqlens, max_seqlen) + ff, logits


class ParallelBlockModel(LlamaModel):
    layer_class = ParallelBlockLayer


class ParallelBlockForCausalLM(CausalLM):
    decoder_class = ParallelBlockModel


class ParallelBlockForValue(ValueModel):
    decoder_class = ParallelBlockModel
