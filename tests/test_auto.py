"""The family-agnostic API: one flavor registry, `dtllama.from_pretrained` picking the family from config.json, and
`ParallelDims.resolve` validating every degree against the model (pp against its layer count too)."""

from __future__ import annotations

import pytest
import torch

import dtllama
from dtllama.parallel import ParallelDims


@pytest.mark.parametrize("flavor, cls", [("debug", dtllama.LlamaForCausalLM), ("llama4-debug", dtllama.Llama4ForCausalLM)])
def test_from_pretrained_builds_the_family_of_the_folder(tmp_path, flavor, cls):
    config = dtllama.flavors[flavor]
    assert dtllama.model_class(config) is cls
    model = cls(config)
    model.init_weights(seed=int(torch.randint(0, 2**16, ())))
    model.save_pretrained(tmp_path / "hf")
    back = dtllama.from_pretrained(tmp_path / "hf")
    assert type(back) is cls and back.config == config
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert type(dtllama.config_from_hf(tmp_path / "hf")) is type(config)


def test_a_family_without_a_critic_says_so():
    with pytest.raises(ValueError, match="llama4_text has no value model"):
        dtllama.model_class(dtllama.flavors["llama4-debug"], value=True)
    assert dtllama.model_class(dtllama.flavors["debug"], value=True) is dtllama.LlamaForValue


def test_resolve_checks_pp_against_the_layers():
    config = dtllama.flavors["smollm2-135m"]  # 30 layers
    assert ParallelDims(pp=30).resolve(30, config).pp == 30
    with pytest.raises(ValueError, match=r"pp=31 needs at least one decoder layer .* num_hidden_layers=30: choose pp "
                                         r"in 1..30"):
        ParallelDims(pp=31).resolve(31, config)
