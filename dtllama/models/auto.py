"""Pick the family from a config: `from_pretrained(path)` reads a folder's `config.json` and builds the right model.

Each family names its config class and its model classes here, once; everything else (the recipes, the parallel
layer through the model protocol) then works on whatever this returns.
"""

from __future__ import annotations

import os

import torch

from dtllama.models.config import ARCHITECTURES, OTHER_FAMILIES, ModelConfig, read_config_json
from dtllama.models.hf import HFCausalLM, HFConfig, HFValue
from dtllama.models.llama import LlamaForCausalLM, LlamaForValue
from dtllama.models.llama4 import Llama4Config, Llama4ForCausalLM
from dtllama.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, Qwen3ForValue
from dtllama.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM, Qwen3MoeForValue

# config class -> (causal LM, value model or None)
MODEL_CLASSES: dict[type, tuple[type, type | None]] = {
    ModelConfig: (LlamaForCausalLM, LlamaForValue),
    Llama4Config: (Llama4ForCausalLM, None),
    Qwen3Config: (Qwen3ForCausalLM, Qwen3ForValue),
    Qwen3MoeConfig: (Qwen3MoeForCausalLM, Qwen3MoeForValue),
    HFConfig: (HFCausalLM, HFValue),
}


def native(model_type: str) -> bool:
    """Whether dtllama has the family of `model_type` natively (its own modules, every parallelism)."""
    return model_type in ARCHITECTURES or model_type in OTHER_FAMILIES


def config_from_hf(path_or_dict, adapter: bool = False):
    """The config of an HF folder (or `config.json`, or its dict): of its native family's class where dtllama has
    one, else (or with `adapter`) an `HFConfig` for transformers' own modules (`dtllama.models.hf`)."""
    d = read_config_json(path_or_dict)
    if adapter or not native(d.get("model_type", "llama")):
        return HFConfig.from_hf(d)
    return ModelConfig.from_hf(d)


def model_class(config, value: bool = False) -> type:
    """The causal-LM class of `config`'s family, or its value (critic) class; an error names a family without one."""
    if type(config) not in MODEL_CLASSES:
        raise TypeError(f"{type(config).__name__} is no dtllama family's config; use one of "
                        f"{[c.__name__ for c in MODEL_CLASSES]}")
    causal, critic = MODEL_CLASSES[type(config)]
    if value and critic is None:
        raise ValueError(f"{config.model_type} has no value model in dtllama yet; a critic needs a dense family "
                         "(or the Hugging Face adapter: config_from_hf(path, adapter=True))")
    return critic if value else causal


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32, value: bool = False,
                    adapter: bool = False):
    """Load an HF folder on the host as the model of its family (`value`: as a critic; `adapter`: through
    transformers' own modules even where dtllama has the family); parallel training builds on the meta device and
    loads into the parallelized model instead (`dtllama.models.hf_io.load_state_into`)."""
    return model_class(config_from_hf(path, adapter), value).from_pretrained(path, dtype=dtype)


__all__ = ["MODEL_CLASSES", "config_from_hf", "from_pretrained", "model_class", "native"]
