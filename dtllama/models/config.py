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
from typing import Any, ClassVar

ARCHITECTURES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
ROPE_TYPES = ("default", "linear", "llama3")
# model_type -> the config class of a family other than the dense one (each registers itself: `register_family`).
OTHER_FAMILIES: dict[str, type] = {}


def register_family(config_class: type, model_types: tuple[str, ...]) -> type:
    """Make `ModelConfig.from_hf` (and so `dtllama.from_pretrained`) read `model_types` with `config_class`."""
    for t in model_types:
        OTHER_FAMILIES[t] = config_class
    return config_class


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
    # HF's `architectures`, read only to pick the value head's layout (`value_head`); `to_hf` writes the model's own.
    architectures: list[str] | None = field(default=None, compare=False)
    # Fields of the source config.json we do not interpret but write back (e.g. chat-template ids).
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.model_type not in self.ARCHITECTURES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported by {type(self).__name__}; it reads "
                f"{sorted(self.ARCHITECTURES)}"
            )
        check_attention_fields(self)

    ARCHITECTURES: ClassVar[dict[str, str]] = ARCHITECTURES  # the model types this class reads, and HF's prefix

    @property
    def hf_prefix(self) -> str:
        """HF's class-name prefix of this model type (`Qwen2` of `Qwen2ForCausalLM`)."""
        return self.ARCHITECTURES[self.model_type]

    # Qwen2 puts a bias on q/k/v but not o; Llama's `attention_bias` covers all four.
    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def value_head(self) -> str:
        """HF layout of `LlamaForValue`'s `score`: "ForTokenClassification" when `architectures` names one (verl
        saves its critics so), else "ForSequenceClassification" (a causal-LM checkpoint starts a critic so)."""
        token = any(a.endswith("ForTokenClassification") for a in self.architectures or ())
        return "ForTokenClassification" if token else "ForSequenceClassification"

    @property
    def score_bias(self) -> bool:
        """HF's token-classification head has `score.bias` (unless its config sets `token_classification_bias`
        false); the sequence-classification head has none."""
        return self.value_head == "ForTokenClassification" and bool(self.extra.get("token_classification_bias", True))

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict) -> "ModelConfig":
        """Read a transformers 4 or 5 `config.json` (a folder, the file, or its dict)."""
        return cls._from_dict(read_config_json(path_or_dict))

    @classmethod
    def _from_dict(cls, d: dict) -> "ModelConfig":
        model_type = d.get("model_type", "llama")
        other = OTHER_FAMILIES.get(model_type)
        if other is not None and other is not cls:  # another family's config.json: read by its config class
            return other.from_hf(d)
        if model_type not in cls.ARCHITECTURES:
            raise ValueError(
                f"config field model_type={model_type!r} (architectures={d.get('architectures')}) is not "
                f"supported; dtllama supports {sorted({*ARCHITECTURES, *OTHER_FAMILIES})}"
            )
        if any(t != "full_attention" for t in d.get("layer_types") or ()):
            raise ValueError(f"config field layer_types={d['layer_types']} is not supported; dtllama runs full "
                             "causal attention in every layer")
        check_unsupported(d)
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
        theta, scaling = read_rope(d)
        kwargs, extra = fields_of(cls, d)
        if model_type == "qwen2":
            kwargs.pop("attention_bias", None)  # Qwen2's q/k/v bias is implied by the architecture.
        return cls(rope_theta=float(theta), rope_scaling=scaling, extra=extra, **kwargs)

    def to_hf(self, architecture: str = "ForCausalLM") -> dict[str, Any]:
        """A `config.json` dict that transformers 4 and 5 both load as this model."""
        d = fields_for_hf(self, self.hf_prefix + architecture)
        if self.model_type == "qwen2":
            d.pop("attention_bias")
            d.setdefault("use_sliding_window", False)
        return d

    def tp_widths(self) -> dict[str, int]:
        """The SwiGLU widths tensor parallelism splits, by field name (the model protocol's config side)."""
        return {"intermediate_size": self.intermediate_size}

    def num_params(self, value_head: bool = False) -> int:
        """Parameter count (tied embeddings counted once), without building the model."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        attn = h * q * 2 + h * kv * 2 + (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias
        layer = attn + mlp + 2 * h
        head = h + self.score_bias if value_head else (0 if self.tie_word_embeddings else self.vocab_size * h)
        return self.vocab_size * h + self.num_hidden_layers * layer + h + head


# The config writer and reader every family shares.


def fields_for_hf(config, architecture: str) -> dict[str, Any]:
    """A `config.json` dict that transformers 4 and 5 both load: the config dataclass's fields over the source
    file's uninterpreted ones (`extra`, less any quantization: weights are written in plain dtypes), RoPE in both
    spellings (`rope_scaling` + `rope_theta` for transformers 4, `rope_parameters` for 5)."""
    d = dict(config.extra)
    d.pop("quantization_config", None)
    for f in dataclasses.fields(config):
        if f.name not in ("extra", "rope_scaling"):
            d[f.name] = getattr(config, f.name)
    d["architectures"] = [architecture]
    d["hidden_act"] = "silu"
    d["rope_scaling"] = dict(config.rope_scaling) if config.rope_scaling else None
    d["rope_parameters"] = {"rope_theta": config.rope_theta, **(config.rope_scaling or {"rope_type": "default"})}
    d["dtype"] = config.torch_dtype
    return d


def fields_of(cls, d: dict, keep_none: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """`(the dataclass fields a config.json sets, the fields it sets that `cls` does not interpret)`; a None value
    counts as unset unless its field is in `keep_none`. RoPE is read apart (`read_rope`)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_theta", "rope_scaling"}
    kwargs = {k: d[k] for k in names if k in d and (d[k] is not None or k in keep_none)}
    kwargs["torch_dtype"] = str(d.get("torch_dtype") or d.get("dtype") or "bfloat16")
    known = names | {"rope_theta", "rope_scaling", "rope_parameters", "dtype"}
    return kwargs, {k: v for k, v in d.items() if k not in known}


def check_unsupported(d: dict) -> None:
    """Fields every family refuses: another activation than SwiGLU's, attention dropout."""
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config field hidden_act={act!r} is not supported; only 'silu' (SwiGLU) is")
    if d.get("attention_dropout", 0.0):
        raise ValueError(f"config field attention_dropout={d['attention_dropout']} is not supported; set it to 0.0")


def check_attention_fields(config) -> None:
    """Fill `num_key_value_heads` and `head_dim` as HF does, check the heads fit, normalize `rope_scaling`."""
    if config.num_key_value_heads is None:
        config.num_key_value_heads = config.num_attention_heads
    if config.head_dim is None:
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size={config.hidden_size} is not divisible by num_attention_heads="
                             f"{config.num_attention_heads}; set head_dim explicitly")
        config.head_dim = config.hidden_size // config.num_attention_heads
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"num_attention_heads={config.num_attention_heads} is not a multiple of "
                         f"num_key_value_heads={config.num_key_value_heads}")
    if config.head_dim % 2:
        raise ValueError(f"head_dim={config.head_dim} must be even for rotary embeddings")
    s = config.rope_scaling
    if s is not None and (s.get("rope_type") or s.get("type")) == "default":
        config.rope_scaling = None
    if config.rope_scaling is not None:
        config.rope_scaling = _check_rope(dict(config.rope_scaling))


def read_config_json(path_or_dict: str | os.PathLike | dict) -> dict:
    """The dict of a `config.json`: given as a dict, or read from the file or the folder holding it."""
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict)
    p = os.fspath(path_or_dict)
    if os.path.isdir(p):
        p = os.path.join(p, "config.json")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"no config.json at {p!r}; pass a Hugging Face model folder")
    with open(p) as f:
        return json.load(f)


def read_rope(d: dict) -> tuple[float, dict | None]:
    """RoPE theta and scaling of a config.json dict, from either spelling: transformers 5 keeps both in
    `rope_parameters`, 4 splits them into `rope_theta` and `rope_scaling`. A file may carry both (dtllama's
    exports do, for either reader); if they disagree, the two transformers versions would build different
    models, so that is an error rather than a silent pick."""
    params = d.get("rope_parameters") or {}
    old_theta, new_theta = d.get("rope_theta"), params.get("rope_theta")
    if old_theta is not None and new_theta is not None and float(old_theta) != float(new_theta):
        raise ValueError(
            f"config.json sets RoPE theta twice and the values disagree: rope_theta={old_theta} (transformers 4) "
            f"but rope_parameters.rope_theta={new_theta} (transformers 5); set both to the value the checkpoint "
            "was trained with, or delete the stale field"
        )
    theta = new_theta if new_theta is not None else old_theta if old_theta is not None else 10000.0
    new_spec = {k: v for k, v in params.items() if k != "rope_theta"}
    old_scaling, new_scaling = _scaling_of(d.get("rope_scaling")), _scaling_of(new_spec)
    if new_spec and d.get("rope_scaling") is not None and not _same_scaling(old_scaling, new_scaling):
        raise ValueError(
            f"config.json sets RoPE scaling twice and the values disagree: rope_scaling={d['rope_scaling']} "
            f"(transformers 4) but rope_parameters={params} (transformers 5); make rope_scaling equal to "
            "rope_parameters without its rope_theta, or delete the stale field"
        )
    scaling = new_scaling if new_spec else old_scaling
    if scaling is not None and scaling["rope_type"] not in ROPE_TYPES:
        raise ValueError(f"config field rope_scaling.rope_type={scaling['rope_type']!r} is not supported; dtllama "
                         f"supports {list(ROPE_TYPES)}")
    return float(theta), scaling


def _scaling_of(s: dict | None) -> dict | None:
    """An HF `rope_scaling` (or `rope_parameters` without theta) as `{"rope_type": ..., **params}`; None for
    no scaling (absent, or of type "default"). `type` is transformers' older key for `rope_type`."""
    if not s:
        return None
    s = dict(s)
    rope_type = s.pop("rope_type", None) or s.pop("type", None) or "default"
    s.pop("type", None)
    return None if rope_type == "default" else {"rope_type": rope_type, **s}


def _same_scaling(a: dict | None, b: dict | None) -> bool:
    """Whether two normalized scalings build the same model: the same type and equal values of the keys that
    type reads (all keys for a type dtllama does not know; the later check names it)."""
    if a is None or b is None:
        return a is b
    if a["rope_type"] != b["rope_type"]:
        return False
    keys = _ROPE_KEYS.get(a["rope_type"]) or (set(a) | set(b))
    return all(a.get(k) == b.get(k) for k in keys)


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
