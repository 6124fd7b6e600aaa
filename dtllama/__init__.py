"""dtllama: Llama-family models trained with PyTorch's own distributed stack."""

import importlib.util as _util
import os as _os

# `ops/` and `parallel/` sit beside this folder; installs map them into this package (pyproject's
# package-dir). Where nothing maps them (a legacy editable install, a bare checkout on sys.path),
# look for them beside this folder.
if _util.find_spec("dtllama.ops") is None:
    __path__.append(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

from ._flavors import flavors  # noqa: E402
from .config import ModelConfig  # noqa: E402
from .model import CausalLMOutput, LlamaForCausalLM, LlamaForValue, ValueOutput  # noqa: E402

__all__ = ["CausalLMOutput", "LlamaForCausalLM", "LlamaForValue", "ModelConfig", "ValueOutput", "flavors"]
