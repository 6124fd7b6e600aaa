"""A family defined in tests (`third_family.py`: parallel attention + MoE blocks) runs on every parallelism through
the model protocol alone: TP/SP, Ulysses CP, EP, FSDP and pipeline stages learn its layout from the family's own
declarations, and each layout gives the single-device fp32 numbers (the property tests' comparison)."""

from __future__ import annotations

import pytest
import torch
from parallel_cases import random_sequences, reference, run_rank
from pool import get_pool
from test_parallel_properties import TOL, rel
from test_pp import check_pipeline

import third_family
from dtllama.models import protocol as P
from dtllama.parallel.pp import PipelineOptions

CONFIG = dict(family=third_family.FAMILY, vocab_size=61, hidden_size=32, intermediate_size=8, intermediate_size_mlp=12,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
              rope_theta=1e4, num_local_experts=4, num_experts_per_tok=2, moe_layers=[1], tie_word_embeddings=False,
              initializer_range=0.2, torch_dtype="float32")
LENGTHS = [9, 1, 12, 8, 5, 3, 7]


def check_layout(world: int, layout: dict, config: dict, value: bool, lengths=LENGTHS) -> list[dict]:
    """One fresh random batch on `layout` against the single-device model, compared as the property tests compare:
    outputs, gradients, parameters after AdamW and the gradient norm within fp32 rounding (TOL). Returns the ranks'
    results."""
    seed = int(torch.randint(0, 2**16, ()))
    seqs, labels = random_sequences(lengths, config["vocab_size"], torch.Generator().manual_seed(seed))
    layout = dict(layout, dp_shard=layout.get("dp_shard", -1))
    results = get_pool(world).run(run_rank, config, layout, seqs, labels, seed, value)
    outs, grads, params, norm = reference(config, seqs, labels, seed, value)
    grad_floor = 0.1 * max(float(g.abs().max()) for g in grads.values())  # as the property tests compare
    param_floor = max(float(p.abs().max()) for p in params.values())
    value_floor = config["initializer_range"] * config["hidden_size"] ** 0.5
    for r in results:
        for key, per_seq in r["outs"].items():
            for j, i in enumerate(r["indices"]):
                assert rel(per_seq[j], outs[key][i], value_floor if key == "values" else 0.0) <= TOL, (key, i)
        for name in grads:
            assert rel(r["grads"][name], grads[name], grad_floor) <= TOL, ("grad", name)
            assert rel(r["params"][name], params[name], param_floor) <= TOL, ("param", name)
        assert abs(r["norm"] - norm) <= TOL * norm
    return results


@pytest.mark.parametrize("world, layout", [
    (2, dict(tp=2)), (2, dict(cp=2)), (2, dict(ep=2)), (4, dict(ep=2, tp=2)), (4, dict(cp=2, dp_shard=2)),
], ids=["tp2", "cp2", "ep2", "ep2xtp2", "cp2xdp2"])
@pytest.mark.parametrize("value", [False, True], ids=["logprobs", "values"])
def test_a_new_family_needs_no_parallel_code(world, layout, value):
    for r in check_layout(world, layout, CONFIG, value):
        experts = {n: p for n, p in r["placements"].items() if ".mlp.experts." in n}
        assert experts and all(("ep" in p[0]) == ("ep" in layout) for p in experts.values() if p), experts


@pytest.mark.parametrize("world, layout, schedule", [
    (2, dict(pp=2), "1F1B"), (4, dict(pp=2, dp_shard=2, ep=2), "Interleaved1F1B"), (4, dict(pp=2, tp=2), "1F1B"),
], ids=["pp2", "pp2xep2", "pp2xtp2"])
def test_a_new_family_pipelines(world, layout, schedule):
    options = PipelineOptions(schedule, microbatches=4, microbatch_tokens=16)
    config = dict(CONFIG, moe_layers=[1, 2], intermediate_size=8 * layout.get("tp", 1))
    check_pipeline(world, dict(layout, dp_shard=layout.get("dp_shard", -1)), 4, False, options, config=config)


def test_the_family_declares_its_layout():
    config = third_family.ParallelBlockConfig(**{k: v for k, v in CONFIG.items() if k != "family"})
    with torch.device("meta"):
        model = third_family.ParallelBlockForCausalLM(config)
    dense, moe = (layer.plan() for layer in model.model.layers.values())
    assert dense.experts is None and moe.experts == "mlp.experts"
    assert isinstance(moe.tp["mlp.router"], P.Router) and "post_attention_layernorm" not in moe.tp
    assert set(model.plan().tp) == {"model.embed_tokens", "model.norm", "lm_head"}


def test_a_family_missing_a_hook_is_told_which():
    """The base classes' hooks a family must define (`Decoder.layer_inputs`; a head, by deriving from `CausalLM` or
    `ValueModel`) raise an error naming the class and the fix when a family leaves one out."""
    from dtllama.models.blocks import Decoder, PretrainedModel
    from dtllama.models.llama import LlamaModel

    config = third_family.ParallelBlockConfig(**{k: v for k, v in CONFIG.items() if k != "family"})

    class NoInputs(LlamaModel):
        layer_inputs = Decoder.layer_inputs  # as a family that never defined it

    class Headless(PretrainedModel):
        decoder_class = LlamaModel

    with pytest.raises(NotImplementedError, match="NoInputs must define layer_inputs"):
        NoInputs(config)(torch.randint(0, config.vocab_size, (5,)), torch.arange(5),
                         torch.tensor([0, 5], dtype=torch.int32), 5)
    with pytest.raises(NotImplementedError, match="Headless must derive from CausalLM or ValueModel"):
        Headless(config)
