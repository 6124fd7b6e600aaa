"""Named model shapes of every family, copied from the published `config.json` of each model: one registry,
`dtllama.flavors[name]`, a fresh config of the right family each time."""

from __future__ import annotations

from collections.abc import Mapping

from dtllama.models.config import ModelConfig
from dtllama.models.llama4_config import Llama4Config
from dtllama.models.qwen3 import Qwen3Config
from dtllama.models.qwen3_moe import Qwen3MoeConfig


def _llama3(factor: float, **kw) -> ModelConfig:
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    return ModelConfig(
        vocab_size=128256, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=scaling, max_position_embeddings=131072, bos_token_id=128000,
        eos_token_id=128001, **kw,
    )


def _qwen25(**kw) -> ModelConfig:
    return ModelConfig(
        model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=151643,
        eos_token_id=151643, **kw,
    )


_FLAVORS = {
    "debug": lambda: ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-5, torch_dtype="float32",
    ),
    "smollm2-135m": lambda: ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2,
    ),
    "llama3.2-1b": lambda: _llama3(
        32.0, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, head_dim=64, tie_word_embeddings=True,
    ),
    "llama3.2-3b": lambda: _llama3(
        32.0, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, head_dim=128, tie_word_embeddings=True,
    ),
    "llama3.1-8b": lambda: _llama3(
        8.0, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    ),
    "llama3.1-70b": lambda: _llama3(
        8.0, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
    ),
    "llama3.1-405b": lambda: _llama3(
        8.0, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
        num_attention_heads=128,
    ),
    "qwen2.5-0.5b": lambda: _qwen25(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": lambda: _qwen25(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
    ),
}


_LLAMA4_COMMON = dict(
    vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384, num_hidden_layers=48,
    num_attention_heads=40, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    attention_chunk_size=8192, attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1, num_experts_per_tok=1,
    bos_token_id=200000, eos_token_id=[200001, 200007, 200008], pad_token_id=200018,
)

# The text models of the published `config.json`s (meta-llama/Llama-4-{Scout-17B-16E,Maverick-17B-128E}).
_LLAMA4 = {
    "llama4-scout": lambda: Llama4Config(
        **_LLAMA4_COMMON, num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
        max_position_embeddings=10485760,
        rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192},
    ),
    "llama4-maverick": lambda: Llama4Config(
        **_LLAMA4_COMMON, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
        max_position_embeddings=1048576,
    ),
}


# A tiny Scout-like shape (every 4th layer NoPE, chunked attention, qk norm, MoE in every layer) for CPU runs.
_LLAMA4["llama4-debug"] = lambda: Llama4Config(
    vocab_size=512, hidden_size=64, intermediate_size=128, intermediate_size_mlp=256, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=500000.0,
    attention_chunk_size=64, attn_temperature_tuning=True, floor_scale=64, attn_scale=0.1, num_experts_per_tok=1,
    num_local_experts=4, interleave_moe_layer_step=1, use_qk_norm=True, max_position_embeddings=1024,
    torch_dtype="float32",
)

_FLAVORS.update(_LLAMA4)


def _qwen3(**kw) -> Qwen3Config:
    """The published Qwen/Qwen3-* config.json files: head_dim 128, 8 KV heads, theta 1e6, 40960 positions."""
    return Qwen3Config(vocab_size=151936, head_dim=128, num_key_value_heads=8, rms_norm_eps=1e-6,
                       max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645, **kw)


_FLAVORS.update({
    "qwen3-0.6b": lambda: _qwen3(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, tie_word_embeddings=True),
    "qwen3-1.7b": lambda: _qwen3(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                 num_attention_heads=16, tie_word_embeddings=True),
    "qwen3-4b": lambda: _qwen3(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                               num_attention_heads=32, tie_word_embeddings=True),
    "qwen3-8b": lambda: _qwen3(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32),
    "qwen3-14b": lambda: _qwen3(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                                num_attention_heads=40),
    "qwen3-32b": lambda: _qwen3(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                                num_attention_heads=64),
    # A tiny Qwen3 shape (head_dim apart from hidden / heads, GQA 2:1) for CPU runs.
    "qwen3-debug": lambda: Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       max_position_embeddings=1024, rms_norm_eps=1e-6, torch_dtype="float32"),
})


def _qwen3_moe(**kw) -> Qwen3MoeConfig:
    """The published Qwen/Qwen3-30B-A3B and -235B-A22B config.json files: 128 experts, top-8, renormalized."""
    return Qwen3MoeConfig(vocab_size=151936, head_dim=128, num_key_value_heads=4, rms_norm_eps=1e-6,
                          rope_theta=1000000.0, max_position_embeddings=40960, num_local_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, bos_token_id=151643, eos_token_id=151645,
                          **kw)


_FLAVORS.update({
    "qwen3-30b-a3b": lambda: _qwen3_moe(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_hidden_layers=48, num_attention_heads=32),
    "qwen3-235b-a22b": lambda: _qwen3_moe(hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                                          num_hidden_layers=94, num_attention_heads=64),
    # A tiny Qwen3-MoE (8 experts, top-2, a dense first layer) for CPU runs.
    "qwen3-moe-debug": lambda: Qwen3MoeConfig(
        vocab_size=512, hidden_size=64, intermediate_size=160, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        num_local_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
        torch_dtype="float32"),
})


class UnknownFlavorError(KeyError, ValueError):
    def __str__(self):
        return self.args[0]


class Flavors(Mapping):
    """`dtllama.flavors[name]` is a fresh config (a new object each time, safe to modify) of its family's class."""

    def __getitem__(self, name: str) -> ModelConfig:
        if name not in _FLAVORS:
            raise UnknownFlavorError(f"unknown flavor {name!r}; choose one of {list(_FLAVORS)}")
        return _FLAVORS[name]()

    def __iter__(self):
        return iter(_FLAVORS)

    def __len__(self):
        return len(_FLAVORS)


flavors = Flavors()
