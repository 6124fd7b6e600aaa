"""dtllama: Llama-family models trained with PyTorch's own distributed stack."""

import importlib.util as _util

# `ops/` and `parallel/` sit beside this folder; the install maps them into this package
# (pyproject's package-dir), and that mapping is the only one: a bare source tree on the import path has no
# `dtllama.ops`, and no other folder is searched.
if _util.find_spec("dtllama.ops") is None or _util.find_spec("dtllama.parallel") is None:
    raise ImportError(
        "dtllama.ops / dtllama.parallel are not importable: dtllama is imported from a source tree that is not "
        "installed. From the repository root run `pip install -e .` (or `bash scripts/setup.sh`; on a machine that "
        "already has torch: `pip install --no-deps --no-build-isolation -e .`)"
    )

from dtllama.models.auto import config_from_hf, from_pretrained, model_class  # noqa: E402
from dtllama.models.config import ModelConfig  # noqa: E402
from dtllama.models.flavors import flavors  # noqa: E402
from dtllama.models.llama import CausalLMOutput, LlamaForCausalLM, LlamaForValue, ValueOutput  # noqa: E402
from dtllama.models.llama4 import Llama4Config, Llama4ForCausalLM  # noqa: E402

__all__ = ["CausalLMOutput", "Llama4Config", "Llama4ForCausalLM", "LlamaForCausalLM", "LlamaForValue", "ModelConfig",
           "ValueOutput", "config_from_hf", "flavors", "from_pretrained", "model_class"]
