"""Llama 4 text-model configuration with Hugging Face's field names (`Llama4TextConfig`, model_type "llama4_text").

A `config.json` is either a text model's or a multimodal one's (`Llama4ForConditionalGeneration`, model_type
"llama4"), whose text part sits under `text_config`. Defaults are transformers' (a field a checkpoint omits means
what HF would read), and, as for the dense models, a field that would change the math in a way this model does
not implement is an error naming it, never a silent default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from dtllama.models.config import (
    check_attention_fields, check_unsupported, fields_for_hf, fields_of, read_config_json, read_rope, register_family,
)

DEFAULT_ROPE_THETA = 500000.0  # Llama4TextConfig.default_theta: what a config without any theta means


@dataclass
class Llama4Config:
    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # each routed expert's and the shared expert's
    intermediate_size_mlp: int = 16384  # the dense layers' (Maverick interleaves them with MoE layers)
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-5  # RMSNorm's and the weightless q/k L2 norm's
    rope_theta: float = DEFAULT_ROPE_THETA
    # None, or {"rope_type": "linear" | "llama3", ...} as dtllama.ModelConfig keeps it.
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q, k, v and o alike
    num_experts_per_tok: int = 1
    num_local_experts: int = 16
    moe_layers: list[int] | None = None  # None: every `interleave_moe_layer_step`-th layer, as HF derives it
    interleave_moe_layer_step: int = 1
    use_qk_norm: bool = True
    router_aux_loss_coef: float = 0.001
    # dtllama's, not HF's: aux-loss-free balancing's bias step (`dtllama.models.moe`); None: off. Not exported.
    load_balance_coeff: float | None = None
    # Per layer, 1 = RoPE (chunked attention), 0 = NoPE (full attention, temperature tuning). None: HF's default,
    # every `no_rope_layer_interval`-th layer NoPE.
    no_rope_layers: list[int] | None = None
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192  # None: RoPE layers attend to the whole sequence too
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    initializer_range: float = 0.02
    bos_token_id: int | list[int] | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    model_type: str = "llama4_text"
    # Fields of the source config.json this model does not interpret but writes back.
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.model_type != "llama4_text":
            raise ValueError(f"model_type={self.model_type!r} is not a Llama 4 text model; expected 'llama4_text'")
        check_attention_fields(self)
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_local_experts="
                             f"{self.num_local_experts}")
        self._fill_layer_lists()
        if self.attention_chunk_size is not None and self.attention_chunk_size < 1:
            raise ValueError(f"attention_chunk_size={self.attention_chunk_size} must be positive (or None: no chunks)")
        self.attn_temperature_tuning = bool(self.attn_temperature_tuning)  # published Scout configs say 4

    def _fill_layer_lists(self) -> None:
        """HF's defaults for `no_rope_layers` (an empty list counts as absent, as in HF) and `moe_layers`, checked."""
        n = self.num_hidden_layers
        if not self.no_rope_layers:
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0) for i in range(n)]
        if len(self.no_rope_layers) < n or any(v not in (0, 1) for v in self.no_rope_layers):
            raise ValueError(f"no_rope_layers={self.no_rope_layers} must hold a 0 (NoPE) or 1 (RoPE) for each of the "
                             f"num_hidden_layers={n} layers")
        if self.moe_layers is None:
            if self.interleave_moe_layer_step < 1:
                raise ValueError(f"interleave_moe_layer_step={self.interleave_moe_layer_step} must be >= 1")
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, n, step))
        bad = [i for i in self.moe_layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"moe_layers={self.moe_layers} names layers {bad} outside 0..{n - 1}")

    def tp_widths(self) -> dict[str, int]:
        """The SwiGLU widths TP splits: `intermediate_size` (the shared expert's), and `intermediate_size_mlp` when
        there are dense layers (Maverick's interleave); routed experts are never TP-split."""
        widths = {"intermediate_size": self.intermediate_size}
        if len(self.moe_layers) < self.num_hidden_layers:
            widths["intermediate_size_mlp"] = self.intermediate_size_mlp
        return widths

    def use_rope(self, layer: int) -> bool:
        return bool(self.no_rope_layers[layer])

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def layer_types(self) -> list[str]:
        """HF's per-layer attention kinds: RoPE layers chunked, NoPE layers full."""
        return ["chunked_attention" if self.use_rope(i) else "full_attention" for i in range(self.num_hidden_layers)]

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict) -> "Llama4Config":
        """Read a transformers 4 or 5 `config.json` (a folder, the file, or its dict) of a Llama 4 text model, or
        the text part of a multimodal one."""
        return cls._from_dict(text_config_of(read_config_json(path_or_dict)))

    @classmethod
    def _from_dict(cls, d: dict) -> "Llama4Config":
        check_unsupported(d)
        theta_given = d.get("rope_theta") is not None or (d.get("rope_parameters") or {}).get("rope_theta") is not None
        theta, scaling = read_rope(d)
        kwargs, extra = fields_of(cls, d, keep_none=("attention_chunk_size",))
        extra.pop("layer_types", None)  # checked below against no_rope_layers
        config = cls(rope_theta=float(theta if theta_given else DEFAULT_ROPE_THETA), rope_scaling=scaling,
                     extra=extra, **kwargs)
        if d.get("layer_types") is not None and list(d["layer_types"]) != config.layer_types:
            raise ValueError(f"config field layer_types={d['layer_types']} disagrees with no_rope_layers="
                             f"{config.no_rope_layers} (RoPE layers are chunked, NoPE layers full: "
                             f"{config.layer_types}); dtllama runs that pairing only, so delete layer_types")
        return config

    def to_hf(self, architecture: str = "ForCausalLM") -> dict[str, Any]:
        """A `config.json` dict (model_type "llama4_text") that transformers 4 and 5 load as this model."""
        d = fields_for_hf(self, "Llama4" + architecture)
        d.pop("load_balance_coeff")
        return d

    def num_params(self, active: bool = False) -> int:
        """Parameter count without building the model (tied embeddings counted once). `active`: the parameters
        one token's forward reads, counting the embedding and head tables whole and `num_experts_per_tok` of the
        routed experts, as the published "17B active" counts them."""
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = 2 * h * q + 2 * h * kv + (q + 2 * kv + h) * self.attention_bias
        expert = 3 * h * self.intermediate_size
        routed = self.num_experts_per_tok if active else self.num_local_experts
        moe = self.num_local_experts * h + routed * expert + expert  # router, routed experts, shared expert
        dense = 3 * h * self.intermediate_size_mlp
        layers = sum(attn + 2 * h + (moe if self.is_moe(i) else dense) for i in range(self.num_hidden_layers))
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + layers + h + head


def text_config_of(d: dict) -> dict:
    """The text model's config dict: `d` itself (model_type "llama4_text"), or a multimodal config's
    `text_config` (model_type "llama4"), whose text model the published Scout and Maverick checkpoints carry."""
    model_type = d.get("model_type")
    if model_type == "llama4":
        if not isinstance(d.get("text_config"), dict):
            raise ValueError("a multimodal Llama 4 config.json (model_type 'llama4') needs a text_config dict; "
                             f"this one has text_config={d.get('text_config')!r}")
        return {"model_type": "llama4_text", **{k: v for k, v in d["text_config"].items() if k != "model_type"}}
    if model_type != "llama4_text":
        raise ValueError(f"config field model_type={model_type!r} (architectures={d.get('architectures')}) is not a "
                         "Llama 4 model; Llama4ForCausalLM reads 'llama4_text' or 'llama4' (multimodal) configs, "
                         "dtllama.LlamaForCausalLM the dense families")
    return d


register_family(Llama4Config, ("llama4_text", "llama4"))
