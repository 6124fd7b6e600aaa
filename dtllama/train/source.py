"""Where a run's model comes from: a Hugging Face folder (its config and tokenizer) or a flavor with byte tokens.

The family is whatever the folder's `config.json` or the flavor says (`dtllama.config_from_hf`, `dtllama.flavors`);
`--set FIELD=VALUE` overrides any field of that config.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch.distributed as dist

import dtllama
from dtllama.train.config import ModelSource

# Per-layer lists a family derives from `num_hidden_layers` when they are unset (Llama 4's MoE and NoPE layers):
# a new depth re-derives them unless `--set` gives them too.
DEPTH_DERIVED = {"moe_layers": None, "no_rope_layers": []}


class ByteTokenizer:
    """UTF-8 bytes as token ids, for random flavors that have no tokenizer; eos is 0."""

    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Ids that are no byte (>= 256: the debug vocab has 512) and eos become nothing."""
        return bytes(i for i in ids if 0 < i < 256).decode(errors="replace")


def parse_assignments(assignments: list[str], fields) -> dict:
    """`{FIELD: VALUE}` of `--set FIELD=VALUE` items (VALUE read as JSON: numbers, true/false, null, else a string),
    each FIELD one of `fields`, or a ValueError naming them."""
    changes = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of the config's fields "
                             f"({', '.join(sorted(fields))})")
        try:
            changes[name] = json.loads(value)
        except json.JSONDecodeError:
            changes[name] = value
    return changes


def override(config, assignments: list[str]):
    """The config with `FIELD=VALUE` overrides; a new depth re-derives the per-layer lists a family derives."""
    if not dataclasses.is_dataclass(config):  # a transformers config (the Hugging Face adapter)
        return config.replace(parse_assignments(assignments, config.field_names()))
    fields = {f.name for f in dataclasses.fields(config)}
    changes = {}
    if any(a.startswith("num_hidden_layers=") for a in assignments):
        changes.update({k: v for k, v in DEPTH_DERIVED.items() if k in fields})
    changes.update(parse_assignments(assignments, fields))
    return dataclasses.replace(config, **changes)


def load_source(source: ModelSource):
    """`(config, tokenizer, HF folder or None)`: a random flavor with byte tokens, or an HF checkpoint (by default
    SmolLM2-135M-Instruct, converted once by rank 0 while the others wait)."""
    if source.flavor:
        config = override(dtllama.flavors[source.flavor], source.set)
        if config.vocab_size < 256:
            raise ValueError(f"flavor {source.flavor!r} has vocab_size={config.vocab_size} < 256 byte tokens; "
                             "--set vocab_size=256 or more")
        return config, ByteTokenizer(), None
    from transformers import AutoTokenizer

    path = source.model
    if path is not None and not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r}: no such folder; pass a local Hugging Face checkpoint folder "
                                "(config.json, *.safetensors and the tokenizer files)")
    if path is None:
        from dtllama.models.pretrained import smollm2_135m_instruct

        if dist.get_rank() == 0:
            smollm2_135m_instruct()  # converts once; the other ranks wait for the cache
        dist.barrier()
        path = smollm2_135m_instruct()
    config = dtllama.config_from_hf(path, adapter=source.hf_adapter)
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(f"--model {path!r} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json); "
                                "copy the tokenizer files of the model it was trained from into it")
    return override(config, source.set), AutoTokenizer.from_pretrained(path), path


__all__ = ["ByteTokenizer", "load_source", "override", "parse_assignments"]
