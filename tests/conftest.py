"""Shared fixtures: tiny random Hugging Face checkpoints of every supported family."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF parity tests need transformers ([test] extra)")

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

# name -> (transformers config class, kwargs)
FAMILIES = {
    "llama3": ("LlamaConfig", dict(BASE, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "llama3.2-tied": ("LlamaConfig", dict(BASE, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True)),
    "llama2-linear-rope-bias": ("LlamaConfig", dict(BASE, rope_scaling={"type": "linear", "factor": 2.0},
                                                    attention_bias=True, mlp_bias=True)),
    "qwen2": ("Qwen2Config", dict(BASE, rope_theta=1e6, tie_word_embeddings=True)),
    "head-dim": ("LlamaConfig", dict(BASE, num_attention_heads=4, head_dim=16)),
    "mistral": ("MistralConfig", dict(BASE, sliding_window=None)),
}


@pytest.fixture(scope="module", autouse=True)
def _close_worker_pools_after_each_module():
    """Worker pools live for a module: the next module's torchrun tests then run without them."""
    yield
    import sys

    if "pool" in sys.modules:  # only where a test used one
        sys.modules["pool"].close_pools()


def hf_model(family: str, seed: int = 0, head: str = "ForCausalLM", **overrides):
    """A tiny HF model of `family` with every parameter random (biases and norms too); `overrides` are config
    fields on top of the family's (e.g. `pad_token_id`)."""
    cls_name, kwargs = FAMILIES[family]
    config = getattr(transformers, cls_name)(**dict(kwargs, **overrides))
    if head in ("ForSequenceClassification", "ForTokenClassification"):
        config.num_labels = overrides.get("num_labels", 1)  # a critic's head: one value per token
    arch = cls_name.removesuffix("Config") + head
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (all of `tests/gpu`) need CUDA: run `python -m pytest tests/gpu` on a GPU machine;
    elsewhere they skip, saying so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `python -m pytest tests/gpu` on a GPU machine")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
