"""Pipeline parallelism: every schedule, and pp composed with tp, dp_shard and cp, gives the single-device fp32
numbers; the stage split; bad pipeline inputs raise on every rank; checkpoints move between pp and other layouts.

The objective and reference are the property tests' (`parallel_cases`): log-probs + entropy, or a linear function
of the values, over a fresh random packed batch whose sequences are packed into microbatches by a token budget.
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from parallel_cases import random_sequences, reference
from pool import get_pool
from pp_cases import llama4_reference_with_aux, pp_error, pp_logits, run_pp_mixed_precision, run_pp_rank
from test_parallel_properties import TOL

import dtllama
from dtllama.ops import IGNORE_INDEX, Packed, cu_seqlens_from_lengths
from dtllama.parallel import ParallelDims, pp
from dtllama.ops.packing import split_microbatches
from dtllama.parallel.pp import SCHEDULES, PipelineOptions, check_options, split_layers, stage_rank

LENGTHS = [9, 1, 12, 8, 1, 5, 3]  # 39 tokens: four microbatches of 16 hold them only when packed first-fit


def make_case(layers: int, tp: int = 1):
    seed = int(torch.randint(0, 2**16, ()))
    g = torch.Generator().manual_seed(seed)
    config = dict(vocab_size=61, hidden_size=32, intermediate_size=8 * tp, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
                  rms_norm_eps=1e-5, rope_theta=1e4, initializer_range=0.2, torch_dtype="float32")
    seqs, labels = random_sequences(LENGTHS, config["vocab_size"], g)
    return config, seqs, labels, seed


def check_pipeline(world: int, layout: dict, layers: int, value: bool, options: PipelineOptions, ac: str = "none",
                   config: dict | None = None):
    """Gradients (joined over the ranks' parts), the gradient norm over all stages, one AdamW step, and the last
    stage's outputs, each within fp32 rounding (TOL) of the single-device model (`config`: another model than
    `make_case`'s, with its fresh random batch)."""
    default, seqs, labels, seed = make_case(layers, layout.get("tp", 1))
    config = default if config is None else dict(config, num_hidden_layers=layers)
    ref_outs, ref_grads, ref_params, ref_norm = reference(config, seqs, labels, seed, value)
    results = get_pool(world).run(run_pp_rank, config, layout, seqs, labels, seed, value, options, ac)
    grads, params, outs = {}, {}, {}
    for r in results:
        grads.update(r["grads"])
        params.update(r["params"])
        for name, per_seq in (r["outs"] or {}).items():
            for i, o in zip(r["indices"], per_seq):
                outs.setdefault(name, {})[i] = o
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < TOL, name
        assert rel_err(params[name], ref_params[name]) < TOL, name
    for r in results:
        assert abs(r["norm"] - ref_norm) < TOL * ref_norm
    if not layout.get("cp", 1) > 1:  # under cp the last stage holds a token shard of each microbatch
        assert set(outs) == ({"values"} if value else {"logprobs", "entropy"})
        for name, per_seq in outs.items():
            assert sorted(per_seq) == list(range(len(seqs)))
            for i, o in per_seq.items():
                assert rel_err(o, ref_outs[name][i], floor=1.0) < TOL, (name, i)
    return results


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("value", [False, True], ids=["logprobs", "values"])
def test_every_schedule_matches_single_device(schedule, value):
    """pp=2, two stages per rank where the schedule is interleaved or V-shaped; 4 layers in 4 (or 2) stages."""
    results = check_pipeline(2, dict(pp=2), 4, value, PipelineOptions(schedule, microbatches=4, microbatch_tokens=16))
    placement = SCHEDULES[schedule].placement
    expect = {"single": [[0, 1], [2, 3]], "loop": [[0, 2], [1, 3]], "V": [[0, 3], [1, 2]]}[placement]
    assert [r["stage_layers"] for r in results] == expect


def test_uneven_split_five_layers():
    """5 layers over 2 stages (1F1B): the embedding and head each count as a layer, so stage 0 gets 3 layers."""
    results = check_pipeline(2, dict(pp=2), 5, False, PipelineOptions("1F1B", microbatches=2, microbatch_tokens=24))
    assert [r["stage_layers"] for r in results] == [[0, 1, 2], [3, 4]]


def test_explicit_stage_layers():
    """An explicit split (one layer, then four) instead of the balanced one, interleaved over 2 ranks x 2 stages."""
    options = PipelineOptions("Interleaved1F1B", microbatches=4, microbatch_tokens=16,
                              stage_layers=((0,), (1, 2), (3,), (4,)))
    results = check_pipeline(2, dict(pp=2), 5, True, options)
    assert [r["stage_layers"] for r in results] == [[0, 3], [1, 2, 4]]


@pytest.mark.parametrize("layout, schedule, ac", [
    (dict(pp=2, tp=2), "Interleaved1F1B", "none"),
    (dict(pp=2, dp_shard=2), "1F1B", "selective"),
    (dict(pp=2, cp=2), "ZBVZeroBubble", "full"),
], ids=["pp2xtp2", "pp2xdp2", "pp2xcp2"])
@pytest.mark.parametrize("value", [False, True], ids=["logprobs", "values"])
def test_pipeline_composes(layout, schedule, ac, value):
    check_pipeline(4, dict(layout, dp_shard=layout.get("dp_shard", -1)), 4, value,
                   PipelineOptions(schedule, microbatches=4, microbatch_tokens=16), ac)


def test_split_layers_balances_embedding_and_head():
    # 8 layers + embedding + head = 10 over 4 stages: no stage can cost less than 3
    assert split_layers(8, 4) == [[0, 1], [2, 3, 4], [5, 6], [7]]
    assert split_layers(8, 4, embed_cost=0.0, head_cost=0.0) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert split_layers(5, 2) == [[0, 1, 2], [3, 4]]
    for n, s in [(16, 4), (126, 16), (7, 7)]:
        stages = split_layers(n, s)
        assert [i for st in stages for i in st] == list(range(n)) and all(stages)
    assert [stage_rank(s, 2, "V") for s in range(4)] == [0, 1, 1, 0]
    assert [stage_rank(s, 2, "loop") for s in range(4)] == [0, 1, 0, 1]


def test_microbatches_by_token_budget():
    """Sequences are never split; microbatches are padded to the budget; merge restores the batch order."""
    lengths = [5, 3, 7, 2]
    ids = torch.randint(0, 50, (sum(lengths),))
    cu = cu_seqlens_from_lengths(lengths)
    mbs = split_microbatches(Packed(ids, None, cu, 7, None, ids.clone()), 2, 9)
    assert [p.input_ids.numel() for p in mbs.packed] == [9, 9]
    assert sorted(s for seqs in mbs.seqs for s in seqs) == [0, 1, 2, 3]
    assert torch.equal(mbs.merge([p.input_ids for p in mbs.packed]), ids)
    for p, seqs in zip(mbs.packed, mbs.seqs):  # the padding is a sequence of its own, with ignored labels
        n_real = sum(lengths[s] for s in seqs)
        assert int(p.cu_seqlens[len(seqs)]) == n_real and (p.labels[n_real:] == IGNORE_INDEX).all()
    x = torch.randn(sum(lengths), 3)  # per-token targets: `take` lays them out as each microbatch
    taken = [mbs.take(x, i) for i in range(len(mbs.packed))]
    assert torch.equal(mbs.merge(taken), x)
    for p, seqs, t in zip(mbs.packed, mbs.seqs, taken):
        n_real = sum(lengths[s] for s in seqs)
        assert t.shape == (9, 3) and not t[n_real:].any()


def _options_error(options: PipelineOptions, layers: int = 4, pp: int = 2, tie: bool = False) -> str:
    config = dtllama.ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=16, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    with pytest.raises(ValueError) as e:
        check_options(config, ParallelDims(pp=pp).resolve(pp, config), options)
    return str(e.value)


def test_bad_pipeline_options_are_refused():
    """Refused from the options alone, identically on every rank, before any mesh or collective exists."""
    assert "at least 8 decoder layers" in _options_error(PipelineOptions("Interleaved1F1B", 4), layers=4, pp=4)
    msg = _options_error(PipelineOptions("DualPipeV", microbatches=2))
    assert "needs at least 4 microbatches" in msg and "microbatches=2" in msg
    assert "needs at least 2 microbatches" in _options_error(PipelineOptions("1F1B", microbatches=1))
    assert "multiple of 2" in _options_error(PipelineOptions("Interleaved1F1B", microbatches=3))
    msg = _options_error(PipelineOptions("OneFOneB"))
    assert "unknown pipeline schedule 'OneFOneB'" in msg and "ZBVZeroBubble" in msg
    assert "exactly 2 stage(s)" in _options_error(PipelineOptions("ZBVZeroBubble", stages_per_rank=3))
    assert "contiguous run" in _options_error(PipelineOptions(stage_layers=((0, 2), (1, 3))))


def test_zero_bubble_schedules_are_refused_on_torch_2_11(monkeypatch):
    """torch 2.11's weight-gradient pass fails on custom autograd functions (seen on the GPU machine's 2.11)."""
    monkeypatch.setattr(pp.schedules, "torch_version", lambda: (2, 11))
    for name, schedule in SCHEDULES.items():
        options = PipelineOptions(name, microbatches=4)
        if schedule.splits_backward:
            assert "splits backward" in _options_error(options) and "torch >= 2.13" in _options_error(options)
        else:
            check_options(dtllama.ModelConfig(num_hidden_layers=4, tie_word_embeddings=False),
                          ParallelDims(pp=2).resolve(2), options)


def test_batch_that_does_not_split_raises_on_every_rank():
    """Rank 1 alone gets a sequence longer than a microbatch: both ranks raise the same error, nothing hangs."""
    config, seqs, labels, seed = make_case(4)
    errors = get_pool(2).run(pp_error, config, seqs, labels, seed)
    assert errors[0] == errors[1] and "do not fit 4 microbatches of 16 tokens" in errors[0], errors
    assert "rank 1" in errors[0]


@pytest.mark.parametrize("schedule", ["1F1B", "Interleaved1F1B"])
def test_forward_without_labels_gives_the_logits(schedule):
    """Sampling through a pipeline: microbatches without labels come back from the last stage as full-vocab
    logits (a schedule of their own on the same stages), and with labels as log-probs, both equal to one
    device's."""
    config, seqs, labels, seed = make_case(4)
    model = dtllama.LlamaForCausalLM(dtllama.ModelConfig(**config))
    model.init_weights(seed)
    cu = cu_seqlens_from_lengths(LENGTHS)
    with torch.no_grad():
        ref_logits = model(torch.cat(seqs), cu_seqlens=cu).logits
        ref_lp = model(torch.cat(seqs), cu_seqlens=cu, labels=torch.cat(labels)).logprobs
    results = [r for r in get_pool(2).run(pp_logits, config, dict(pp=2), seqs, labels, seed,
                                          PipelineOptions(schedule, 4, 16)) if r is not None]
    assert len(results) == 1
    logits, lp = results[0]
    assert rel_err(logits, ref_logits) < TOL and rel_err(lp, ref_lp, floor=1.0) < TOL


@pytest.mark.parametrize("schedule", ["1F1B", "Interleaved1F1B"])
def test_pipeline_without_data_parallelism_casts_at_use_like_bf16_parameters(schedule):
    """pp=2 alone with `param_dtype=bf16` takes casts at use, not FSDP on a 1-rank mesh (`mixed_precision.py`):
    fp32 parameters, the last stage's outputs bit for bit those of the same pipeline holding bf16 parameters,
    gradients within bf16 rounding of its (the casts accumulate microbatches and repeated embedding rows in fp32,
    the reference in bf16)."""
    config, seqs, labels, seed = make_case(4)
    ranks = get_pool(2).run(run_pp_mixed_precision, config, seqs, labels, seed, PipelineOptions(schedule, 4, 16))
    for r in ranks:
        mp, ref = r["mp"], r["ref"]
        assert mp["dtypes"] == {torch.float32} and ref["dtypes"] == {torch.bfloat16}
        assert not mp["fsdp"]
        assert mp["grads"].keys() == ref["grads"].keys() and mp["grads"]
        for n, g in ref["grads"].items():
            assert mp["grads"][n].dtype == torch.float32
            assert rel_err(mp["grads"][n], g.float()) <= 2**-7, n
    last = ranks[1]  # both schedules place the last stage on rank 1 (stages 0, 1 or 0..3 round robin)
    assert ranks[0]["mp"]["outs"] is None and last["mp"]["outs"] is not None
    assert all(torch.equal(a, b) for a, b in zip(last["mp"]["outs"], last["ref"]["outs"]))


def _llama4_config() -> dict:
    """A tiny Llama 4 (chunked attention, a NoPE layer, qk norm, top-2 routing over 4 experts, a dense layer)."""
    return dict(model_type="llama4_text", vocab_size=61, hidden_size=32, intermediate_size=8, intermediate_size_mlp=12,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4,
                attention_chunk_size=4, attn_temperature_tuning=True, floor_scale=4, attn_scale=0.1,
                no_rope_layer_interval=2, use_qk_norm=True, num_local_experts=4, num_experts_per_tok=2,
                moe_layers=[0, 1, 3], tie_word_embeddings=False, initializer_range=0.2, torch_dtype="float32",
                router_aux_loss_coef=0.0)  # the objective is the log-probs alone (see the aux-loss test below)


@pytest.mark.parametrize("world, layout, schedule", [
    (2, dict(pp=2), "1F1B"),
    (2, dict(pp=2), "Interleaved1F1B"),
    (4, dict(pp=2, dp_shard=2, ep=2), "Interleaved1F1B"),
], ids=["pp2-1F1B", "pp2-Interleaved1F1B", "pp2xep2"])
def test_llama4_pipeline_matches_single_device(world, layout, schedule):
    """Llama 4 learns its stages from the model protocol like the dense family: MoE and dense layers on either
    stage, routed experts sharded over `ep` inside a stage."""
    results = check_pipeline(world, layout, 4, False, PipelineOptions(schedule, microbatches=4, microbatch_tokens=16),
                             config=_llama4_config())
    if layout.get("ep"):
        experts = {n: p for r in results for n, p in r["placements"].items() if ".experts." in n}
        assert experts and all(p is not None and "ep" in p[0] for p in experts.values()), experts


def _tied_config() -> dict:
    """SmolLM2-shaped: tied embeddings, GQA 3:1, head_dim 8."""
    return dict(vocab_size=61, hidden_size=24, intermediate_size=16, num_attention_heads=3, num_key_value_heads=1,
                tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=1e5, initializer_range=0.2,
                torch_dtype="float32")


@pytest.mark.parametrize("world, layout, schedule", [
    (2, dict(pp=2), "1F1B"),
    (4, dict(pp=2, dp_shard=2), "1F1B"),
    (2, dict(pp=2), "ZBVZeroBubble"),  # V-shaped: rank 0 holds the first and the last stage, one table
], ids=["pp2", "pp2xdp2", "pp2-V"])
def test_tied_embeddings_pipeline_matches_single_device(world, layout, schedule):
    """The first stage's embedding and the last stage's tied head share one gradient (summed over the two pipeline
    ranks), the gradient norm counts it once, and both copies take the same AdamW step."""
    results = check_pipeline(world, dict(layout, dp_shard=layout.get("dp_shard", -1)), 4, False,
                             PipelineOptions(schedule, microbatches=4, microbatch_tokens=16), config=_tied_config())
    holders = [r for r in results if "model.embed_tokens.weight" in r["grads"]]
    if schedule == "1F1B":  # both pipeline ranks hold a copy, equal after the step
        assert len(holders) == world
        first = holders[0]["params"]["model.embed_tokens.weight"]
        assert all(torch.equal(r["params"]["model.embed_tokens.weight"], first) for r in holders)


def test_llama4_pipeline_adds_the_load_balance_loss():
    """Each stage adds its MoE layers' share of the load-balance loss to its backward (the schedule's loss sees only
    the head): with one microbatch holding the whole batch, the router gradients are the single-device gradients
    of the log-prob objective plus the aux loss."""
    config = dict(_llama4_config(), num_hidden_layers=4, router_aux_loss_coef=0.5)
    _, seqs, labels, seed = make_case(4)
    n_tokens = sum(len(s) for s in seqs)
    options = PipelineOptions("GPipe", microbatches=1, microbatch_tokens=n_tokens)  # no padding tail: same stats
    results = get_pool(2).run(run_pp_rank, config, dict(pp=2), seqs, labels, seed, False, options)
    ref_grads = get_pool(1).run(llama4_reference_with_aux, config, seqs, labels, seed)[0]
    grads = {n: g for r in results for n, g in r["grads"].items()}
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < TOL, name
    router = [n for n in ref_grads if n.endswith("router.weight")]
    no_aux = get_pool(1).run(llama4_reference_with_aux, dict(config, router_aux_loss_coef=0.0), seqs, labels, seed)[0]
    assert all(rel_err(no_aux[n], ref_grads[n]) > 100 * TOL for n in router)  # the aux loss moves the routers
