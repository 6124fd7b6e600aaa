"""Qwen3-MoE: the Qwen3 decoder (per-head q/k RMSNorm before RoPE) whose feed-forward is, on every
`decoder_sparse_step`-th layer outside `mlp_only_layers`, a sparse block of many small SwiGLU experts: softmax
over the router logits, the top-k experts, their probabilities renormalized to sum to 1 when `norm_topk_prob`,
each expert's output scaled by its weight. No shared expert.

Parameter names are transformers 5's: the experts stacked (`mlp.experts.gate_up_proj [E, 2I, H]`,
`mlp.experts.down_proj [E, H, I]`) and the router `mlp.gate.weight [E, H]`. HF checkpoint files hold one tensor per
expert (`mlp.experts.{e}.gate_proj.weight`, as the published checkpoints and transformers' `save_pretrained` write
them); `hf_io` reads and writes those as views of each rank's experts (`GroupedExperts.checkpoint_tensors`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from dtllama.models import protocol as P
from dtllama.models.blocks import Linear, RMSNorm, SwiGLU, ValueModel
from dtllama.models.config import register_family
from dtllama.models.moe import GroupedExperts, MoEBlock, Routing, run_experts
from dtllama.models.moe_lm import MoECausalLM
from dtllama.models.qwen3 import Qwen3Attention, Qwen3Config, Qwen3Model


@dataclass
class Qwen3MoeConfig(Qwen3Config):
    """HF's `Qwen3MoeConfig` fields (transformers 5 names the expert count `num_local_experts`; its older name
    `num_experts`, which published config.json files use, is read too and both are written). Defaults are
    transformers' own. `load_balance_coeff` is dtllama's (aux-loss-free balancing, `dtllama.models.moe`), not
    exported."""

    ARCHITECTURES: ClassVar[dict[str, str]] = {"qwen3_moe": "Qwen3Moe"}
    model_type: str = "qwen3_moe"
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144  # the dense layers' (`mlp_only_layers`, or between sparse steps)
    num_hidden_layers: int = 24
    num_key_value_heads: int | None = 4
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    moe_intermediate_size: int = 768  # each expert's
    num_local_experts: int = 128
    num_experts_per_tok: int = 8
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001
    load_balance_coeff: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_local_experts="
                             f"{self.num_local_experts}")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step={self.decoder_sparse_step} must be >= 1")

    def is_moe(self, layer: int) -> bool:
        """HF's rule: a sparse block on every `decoder_sparse_step`-th layer that `mlp_only_layers` leaves out."""
        return (layer not in self.mlp_only_layers and self.num_local_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe(i)]

    def tp_widths(self) -> dict[str, int]:
        """The SwiGLU widths TP splits: the dense layers' only (routed experts are never TP-split)."""
        return {"intermediate_size": self.intermediate_size} if len(self.moe_layers) < self.num_hidden_layers else {}

    @classmethod
    def _from_dict(cls, d: dict) -> "Qwen3MoeConfig":
        d = dict(d)
        if "num_experts" in d:  # transformers 4's and the published files' name
            n = d.pop("num_experts")
            if d.setdefault("num_local_experts", n) != n:
                raise ValueError(f"config.json sets num_experts={n} and num_local_experts={d['num_local_experts']}; "
                                 "they name one count (transformers 4 and 5), so make them equal")
        return super()._from_dict(d)

    def to_hf(self, architecture: str = "ForCausalLM") -> dict[str, Any]:
        d = super().to_hf(architecture)
        d.pop("load_balance_coeff")
        d["num_experts"] = self.num_local_experts
        return d

    def num_params(self, value_head: bool = False, active: bool = False) -> int:
        """Parameter count without building the model (tied embeddings counted once); `active`: the parameters one
        token's forward reads, with `num_experts_per_tok` of the routed experts (the published "A3B" count)."""
        h, n_moe = self.hidden_size, len(self.moe_layers)
        dense_mlp = 3 * h * self.intermediate_size
        routed = self.num_experts_per_tok if active else self.num_local_experts
        moe = self.num_local_experts * h + routed * 3 * h * self.moe_intermediate_size
        return super().num_params(value_head) + n_moe * (moe - dense_mlp)


register_family(Qwen3MoeConfig, ("qwen3_moe",))


class Qwen3MoeExperts(GroupedExperts):
    """The routed experts in transformers 5's layout (`[E, 2I, H]`, `[E, H, I]`); one tensor per expert on disk."""

    per_expert_files = True

    def __init__(self, config: Qwen3MoeConfig):
        super().__init__(config.num_local_experts, config.hidden_size, config.moe_intermediate_size, transposed=True,
                         intermediate_field="moe_intermediate_size")


class Qwen3MoeSparseMoeBlock(MoEBlock):
    """Softmax top-k routing as HF's `Qwen3MoeTopKRouter` (probabilities in fp32; with `load_balance_coeff`, the
    top-k chosen by probability plus bias), the experts run on their own tokens only."""

    def __init__(self, config: Qwen3MoeConfig):
        super().__init__(config.num_local_experts, config.num_experts_per_tok, config.load_balance_coeff)
        self.norm_topk_prob = config.norm_topk_prob
        self.experts = Qwen3MoeExperts(config)
        self.gate = Linear(config.hidden_size, config.num_local_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        selected = self.select(probs)
        weights = probs.gather(1, selected)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        out = run_experts(x, self.experts, selected, weights.to(logits.dtype), scale_inputs=False)
        return out, Routing(logits, selected)


class Qwen3MoeDecoderLayer(nn.Module):
    def __init__(self, config: Qwen3MoeConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen3Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe(layer)
        self.mlp = (Qwen3MoeSparseMoeBlock(config) if self.is_moe
                    else SwiGLU(config.hidden_size, config.intermediate_size, bias=config.mlp_bias))

    def plan(self) -> P.LayerPlan:
        tp = {**P.attention_plan(5), "self_attn.q_norm": P.HeadNorm(), "self_attn.k_norm": P.HeadNorm()}
        if not self.is_moe:
            return P.LayerPlan({**tp, **P.swiglu_plan("mlp")})
        # The router and routed experts work on this rank's own tokens (the experts are sharded by EP, never TP).
        tp.update({"mlp": P.OwnTokens(), "mlp.gate": P.Router()})
        return P.LayerPlan(tp, experts="mlp.experts",
                           compile_parts=("input_layernorm", "self_attn", "post_attention_layernorm"))

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        """`(x, the MoE's routing or None for a dense layer)`."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            h, routing = self.mlp(h)
            return x + h, routing
        return x + self.mlp(h), None


class Qwen3MoeModel(Qwen3Model):
    layer_class = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(MoECausalLM):
    """Causal LM with HF's `Qwen3MoeForCausalLM` parameter names; its output adds `router_stats` (`MoECausalLM`).
    The load-balance loss is per MoE layer, averaged (HF's helper pools the layers' tokens first: equal with one
    MoE layer)."""

    config_class = Qwen3MoeConfig
    decoder_class = Qwen3MoeModel
    casts_at_use = True


class Qwen3MoeForValue(ValueModel):
    """Critic on the MoE decoder (the routing's statistics are not reported: balance a critic by bias)."""

    config_class = Qwen3MoeConfig
    decoder_class = Qwen3MoeModel
    casts_at_use = True


__all__ = ["Qwen3MoeConfig", "Qwen3MoeForCausalLM", "Qwen3MoeForValue"]
