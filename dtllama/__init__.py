"""dtllama: Llama-family models trained with PyTorch's own distributed stack."""

from ._flavors import flavors
from .config import ModelConfig
from .model import CausalLMOutput, LlamaForCausalLM, LlamaForValue, ValueOutput

__all__ = ["CausalLMOutput", "LlamaForCausalLM", "LlamaForValue", "ModelConfig", "ValueOutput", "flavors"]
