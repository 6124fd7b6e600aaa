"""ModelConfig: HF config files of transformers 4 and 5, flavors and their parameter counts."""

import json

import pytest
import torch

import dtllama
from dtllama import ModelConfig


def test_transformers4_and_5_rope_fields_give_the_same_config():
    old = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    new = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
           "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    a, b = ModelConfig.from_hf(old), ModelConfig.from_hf(new)
    assert a == b and a.rope_theta == 500000.0 and a.rope_scaling["factor"] == 8.0
    linear = ModelConfig.from_hf({"hidden_size": 64, "num_attention_heads": 4, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    default = ModelConfig.from_hf({"hidden_size": 64, "num_attention_heads": 4,
                                   "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}})
    assert default.rope_scaling is None


def test_to_hf_round_trips_through_transformers(tmp_path):
    from transformers import AutoConfig

    for name in dtllama.flavors:
        cfg = dtllama.flavors[name]
        (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
        hf = AutoConfig.from_pretrained(tmp_path)
        assert hf.model_type == cfg.model_type and hf.head_dim == cfg.head_dim
        assert ModelConfig.from_hf(hf.to_dict()) == cfg, name
        assert ModelConfig.from_hf(tmp_path) == cfg


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling.rope_type='yarn'"),
        ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, "rope_type='dynamic'"),
        ("hidden_act", "gelu", "hidden_act='gelu'"),
        ("model_type", "gemma", "model_type='gemma'"),
        ("use_sliding_window", True, "sliding_window"),
        ("attention_dropout", 0.1, "attention_dropout=0.1"),
    ],
)
def test_unsupported_field_is_a_clear_error(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        ModelConfig.from_hf({"hidden_size": 64, "num_attention_heads": 4, field: value})


def test_mistral_sliding_window_is_rejected_unless_disabled():
    base = {"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 32768}
    with pytest.raises(ValueError, match="sliding_window=4096"):
        ModelConfig.from_hf(dict(base, sliding_window=4096))
    assert ModelConfig.from_hf(dict(base, sliding_window=None)).model_type == "mistral"


def test_unknown_flavor_names_the_choices():
    with pytest.raises(ValueError, match="unknown flavor 'llama9'.*llama3.1-8b"):
        dtllama.flavors["llama9"]


# Published sizes, written to the digits the model cards give (billions). Qwen2.5-7B's card truncates
# to 7.61; its safetensors index holds 15,231,233,024 bf16 bytes = 7,615,616,512 parameters.
PUBLISHED = {"llama3.1-8b": "8.03", "llama3.2-1b": "1.24", "llama3.2-3b": "3.21", "llama3.1-70b": "70.6",
             "llama3.1-405b": "405.9", "qwen2.5-0.5b": "0.49", "qwen2.5-7b": "7.62", "smollm2-135m": "0.135"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_flavor_parameter_counts_on_meta_device(name):
    cfg = dtllama.flavors[name]
    with torch.device("meta"):
        model = dtllama.LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.num_params()
    decimals = len(PUBLISHED[name].split(".")[1])
    assert f"{n / 1e9:.{decimals}f}" == PUBLISHED[name], (name, n)


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


@pytest.mark.parametrize(
    "old, new, message",
    [
        # theta set twice: 731000.0 (transformers 4's field) against 262144.0 (transformers 5's)
        ({"rope_theta": 731000.0}, {"rope_theta": 262144.0, "rope_type": "default"},
         r"rope_theta=731000\.0 \(transformers 4\) but rope_parameters\.rope_theta=262144\.0"),
        # scaling set twice: llama3 against linear
        ({"rope_scaling": LLAMA3_SCALING}, {"rope_theta": 5e5, "rope_type": "linear", "factor": 3.0},
         r"rope_scaling=\{'rope_type': 'llama3'.*\} \(transformers 4\) but rope_parameters=\{.*'rope_type': 'linear'"),
        # the same type with one differing value (factor 8.0 against 32.0)
        ({"rope_scaling": LLAMA3_SCALING}, dict(LLAMA3_SCALING, factor=32.0, rope_theta=5e5),
         r"rope_scaling=.*'factor': 8\.0.* but rope_parameters=.*'factor': 32\.0"),
        # a stale transformers 4 "no scaling" beside transformers 5's llama3 (transformers 5 itself would take
        # rope_scaling, 4 too, so the llama3 parameters would be silently dropped)
        ({"rope_scaling": {"type": "default"}}, dict(LLAMA3_SCALING, rope_theta=5e5),
         r"rope_scaling=\{'type': 'default'\} \(transformers 4\) but rope_parameters="),
    ],
    ids=["theta", "llama3-vs-linear", "llama3-factor", "stale-default-vs-llama3"],
)
def test_disagreeing_transformers4_and_5_rope_fields_are_an_error(old, new, message):
    d = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "rope_parameters": new, **old}
    with pytest.raises(ValueError, match=message) as err:
        ModelConfig.from_hf(d)
    assert "delete the stale field" in str(err.value)  # the error says how to fix it


def test_agreeing_transformers4_and_5_rope_fields_are_read_once():
    # Both spellings in one file, equal up to spelling: `type` for `rope_type`, ints for floats, keys reordered.
    d = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "rope_theta": 731000,
         "rope_scaling": {"type": "llama3", "original_max_position_embeddings": 8192, "factor": 8, "low_freq_factor": 1,
                          "high_freq_factor": 4},
         "rope_parameters": dict(LLAMA3_SCALING, rope_theta=731000.0)}
    cfg = ModelConfig.from_hf(d)
    assert cfg.rope_theta == 731000.0 and cfg.rope_scaling == LLAMA3_SCALING
    # No scaling, spelled as transformers 4 (null) and 5 ("default") at once.
    cfg = ModelConfig.from_hf({"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 262144.0, "rope_scaling": None,
                               "rope_parameters": {"rope_theta": 262144.0, "rope_type": "default"}})
    assert cfg.rope_theta == 262144.0 and cfg.rope_scaling is None
    # dtllama's own export writes all three fields; it reads back as itself.
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
