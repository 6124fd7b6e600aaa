"""Model configuration with Hugging Face field names, read from and written to `config.json`.

One dataclass covers Llama 2/3/3.1/3.2, Qwen2/2.5 and Mistral (no sliding window): they share the
architecture and differ only in fields below. Anything a checkpoint sets that this model would not
honour is an error naming the field, never a silent default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

ARCHITECTURES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear" | "llama3", "factor": ..., ...} as in HF's `rope_scaling`.
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    initializer_range: float = 0.02
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    # Fields of the source config.json we do not interpret but write back (e.g. chat-template ids).
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; dtllama supports {sorted(ARCHITECTURES)}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None and (self.rope_scaling.get("rope_type") or self.rope_scaling.get("type")) == "default":
            self.rope_scaling = None
        if self.rope_scaling is not None:
            self.rope_scaling = _check_rope(dict(self.rope_scaling))

    # Qwen2 puts a bias on q/k/v but not o; Llama's `attention_bias` covers all four.
    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict) -> "ModelConfig":
        """Read a transformers 4 or 5 `config.json` (a folder, the file, or its dict)."""
        if isinstance(path_or_dict, dict):
            d = dict(path_or_dict)
        else:
            p = os.fspath(path_or_dict)
            if os.path.isdir(p):
                p = os.path.join(p, "config.json")
            if not os.path.isfile(p):
                raise FileNotFoundError(f"no config.json at {p!r}; pass a Hugging Face model folder")
            with open(p) as f:
                d = json.load(f)
        return cls._from_dict(d)

    @classmethod
    def _from_dict(cls, d: dict) -> "ModelConfig":
        model_type = d.get("model_type", "llama")
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"config field model_type={model_type!r} (architectures={d.get('architectures')}) is not "
                f"supported; dtllama supports {sorted(ARCHITECTURES)}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config field hidden_act={act!r} is not supported; only 'silu' (SwiGLU) is")
        if d.get("attention_dropout", 0.0):
            raise ValueError(
                f"config field attention_dropout={d['attention_dropout']} is not supported; set it to 0.0"
            )
        if d.get("use_sliding_window") or (
            model_type == "mistral"
            and d.get("sliding_window") is not None
            and d["sliding_window"] < d.get("max_position_embeddings", math.inf)
        ):
            raise ValueError(
                f"config field sliding_window={d.get('sliding_window')} (use_sliding_window="
                f"{d.get('use_sliding_window')}) is not supported; dtllama runs full causal attention"
            )
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"config field pretraining_tp={d['pretraining_tp']} is not supported; set it to 1")
        # transformers 5 keeps theta and scaling together in `rope_parameters`; 4 splits them.
        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"} or d.get("rope_scaling")
        if scaling is not None:
            scaling = dict(scaling)
            rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
            scaling.pop("type", None)
            scaling = None if rope_type == "default" else {"rope_type": rope_type, **scaling}
            if rope_type not in ROPE_TYPES:
                raise ValueError(
                    f"config field rope_scaling.rope_type={rope_type!r} is not supported; dtllama "
                    f"supports {list(ROPE_TYPES)}"
                )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_theta", "rope_scaling"}
        kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
        if model_type == "qwen2":
            kwargs.pop("attention_bias", None)  # Qwen2's q/k/v bias is implied by the architecture.
        kwargs["torch_dtype"] = str(d.get("torch_dtype") or d.get("dtype") or "bfloat16")
        known = names | {"rope_theta", "rope_scaling", "rope_parameters", "dtype", "architectures"}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(rope_theta=float(theta), rope_scaling=scaling, extra=extra, **kwargs)

    def to_hf(self, architecture: str = "ForCausalLM") -> dict[str, Any]:
        """A `config.json` dict that transformers 4 and 5 both load as this model."""
        d = dict(self.extra)
        d.pop("quantization_config", None)
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "rope_scaling"):
                d[f.name] = getattr(self, f.name)
        if self.model_type == "qwen2":
            d.pop("attention_bias")
            d.setdefault("use_sliding_window", False)
        d["architectures"] = [ARCHITECTURES[self.model_type] + architecture]
        d["hidden_act"] = "silu"
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        d["rope_parameters"] = {"rope_theta": self.rope_theta, **(self.rope_scaling or {"rope_type": "default"})}
        d["dtype"] = self.torch_dtype
        return d

    def num_params(self, value_head: bool = False) -> int:
        """Parameter count (tied embeddings counted once), without building the model."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        attn = h * q * 2 + h * kv * 2 + (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias
        layer = attn + mlp + 2 * h
        head = h if value_head else (0 if self.tie_word_embeddings else self.vocab_size * h)
        return self.vocab_size * h + self.num_hidden_layers * layer + h + head


def _check_rope(s: dict) -> dict:
    rope_type = s.get("rope_type") or s.get("type")
    if rope_type not in ROPE_TYPES[1:]:
        raise ValueError(
            f"rope_scaling.rope_type={rope_type!r} is not supported; use one of {list(ROPE_TYPES)}"
        )
    missing = [k for k in _ROPE_KEYS[rope_type] if k not in s]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks {missing}")
    out = {"rope_type": rope_type}
    out.update({k: s[k] for k in _ROPE_KEYS[rope_type]})
    return out
