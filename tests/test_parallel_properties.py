"""Property tests: any layout of the mesh gives the single-device fp32 numbers.

Hypothesis draws a world size (1, 2 or 4), a layout that factorizes it (`dp_replicate x dp_shard x
cp x tp`), a dense family (Llama, Qwen2 with its biases, Qwen3 with its q/k head norms), model dims consistent
with the layout (query/KV heads incl. `tp > kv`, explicit head_dim, vocab not divisible by tp, tied or not),
activation checkpointing, and a random packed batch; and, for the MoE families (Llama 4, Qwen3-MoE), layouts
with expert parallel (`ep`, with tp, cp and HSDP).
A persistent pool of gloo workers (`pool.py`) runs the sharded computation; the reference runs here.

Settings: `max_examples` below (200 in all per CI run), `deadline=None` (an example's time is
dominated by gloo collectives, which vary with machine load), derandomize off: every run draws
fresh examples. A failing example fails the test; a hung one times out in the pool (120 s).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from helpers import rel_err as rel
from hypothesis import strategies as st
from parallel_cases import model_config, random_sequences, reference, run_rank, validate_rank
from pool import get_pool

import dtllama
from dtllama.parallel import ParallelDims, valid_tp_degrees

# fp32 sums in a different order (sharded matmuls, reduce-scatters) differ by a few ulps; 1e-5
# relative to the largest value leaves ~100 ulps of headroom (DESIGN: "rel. error ~1e-5").
TOL = 1e-5
PROPERTY_SETTINGS = settings(max_examples=160, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def cases(draw, tp_min: int = 1, ac_modes=("none", "full", "selective")):
    world = draw(st.sampled_from([w for w in (1, 2, 4) if w >= tp_min]))
    tp = draw(st.sampled_from([t for t in (1, 2, 4) if world % t == 0 and t >= tp_min]))
    cp = draw(st.sampled_from([c for c in (1, 2, 4) if (world // tp) % c == 0]))
    dp_replicate = draw(st.sampled_from([r for r in (1, 2, 4) if (world // tp // cp) % r == 0]))
    layout = dict(dp_replicate=dp_replicate, dp_shard=-1, cp=cp, tp=tp)
    kv = draw(st.sampled_from([k for k in (1, 2, 4) if k % tp == 0 or tp % k == 0]))
    # Whole query heads on each of the tp*cp ranks; KV heads per TP rank (1, 2 or 4) and cp (1, 2 or 4)
    # always divide one another, so Ulysses splits or repeats them.
    group = draw(st.sampled_from([g for g in (1, 2, 3, 4) if (kv * g) % (tp * cp) == 0]))
    family = draw(st.sampled_from(["llama", "qwen2", "qwen3"]))
    config = dict(
        **(dict(family="qwen3") if family == "qwen3" else dict(model_type=family)),
        vocab_size=draw(st.integers(40, 130)),
        hidden_size=draw(st.sampled_from([16, 24, 32])),
        intermediate_size=tp * draw(st.integers(4, 12)),
        num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=kv * group,
        num_key_value_heads=kv,
        head_dim=draw(st.sampled_from([4, 8])),
        tie_word_embeddings=draw(st.booleans()),
        rms_norm_eps=1e-5,
        rope_theta=draw(st.sampled_from([1e4, 5e5])),
        initializer_range=0.2,  # larger than HF's 0.02 so that logits and gradients are far from zero
        torch_dtype="float32",
    )
    n_batch = world // tp // cp  # the CP ranks of a group share its sequences
    n_seqs = draw(st.integers(n_batch, n_batch + 3))
    lengths = draw(st.lists(st.integers(1, 12), min_size=n_seqs, max_size=n_seqs))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    seqs, labels = random_sequences(lengths, config["vocab_size"], g)
    value = draw(st.booleans())
    ac = draw(st.sampled_from(ac_modes))
    return world, layout, config, seqs, labels, seed, value, ac


@PROPERTY_SETTINGS
@given(case=cases())
def test_any_layout_matches_single_device(case):
    check_case(case)


# Each example compiles its blocks afresh (~15 s on 2 CPU cores): 6 keep CI under its time budget, and the eager
# examples above cover the layouts themselves.
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=cases(tp_min=2, ac_modes=("none", "selective")))
def test_compiled_tensor_parallel_blocks_match_single_device(case):
    """Per-block compile under TP/SP (tp=2 or 4, with FSDP/HSDP when the world allows). The backend is
    aot_eager: the AOTAutograd trace and partition of the sequence-parallel blocks, where compile and
    DTensor meet, without inductor's minutes of C++ codegen per example (the recipe test runs inductor).
    `ac='full'` with compile and tp is refused on a CPU mesh (see ParallelDims.check_model)."""
    check_case(case, compile_backend="aot_eager")


@st.composite
def moe_cases(draw):
    """A Llama 4 or Qwen3-MoE case: world 2 or 4, `tp`, Ulysses `cp` and HSDP as above, `ep` any valid degree
    (1 included), 2-8 experts with top-1 or top-2 routing, every layer MoE or a dense layer first."""
    world = draw(st.sampled_from([2, 4]))
    tp = draw(st.sampled_from([t for t in (1, 2) if world % t == 0]))
    cp = draw(st.sampled_from([c for c in (1, 2) if (world // tp) % c == 0]))
    dp_replicate = draw(st.sampled_from([r for r in (1, 2) if (world // tp // cp) % r == 0]))
    dp_shard = world // tp // cp // dp_replicate
    experts = draw(st.sampled_from([2, 4, 8]))
    ep = draw(st.sampled_from([e for e in (1, 2, 4) if experts % e == 0 and (dp_shard * cp * tp) % e == 0]))
    config = dict(
        vocab_size=draw(st.integers(40, 130)), hidden_size=draw(st.sampled_from([16, 32])),
        intermediate_size=tp * draw(st.integers(2, 8)), num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=draw(st.sampled_from([2, 4])), head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4,
        num_local_experts=experts, num_experts_per_tok=draw(st.integers(1, 2)),
        tie_word_embeddings=draw(st.booleans()), initializer_range=0.2, torch_dtype="float32",
    )
    dense_first = draw(st.booleans())
    if draw(st.sampled_from(["llama4_text", "qwen3_moe"])) == "llama4_text":
        config.update(model_type="llama4_text", intermediate_size_mlp=tp * draw(st.integers(2, 8)),
                      attention_chunk_size=draw(st.sampled_from([None, 3, 8])), attn_temperature_tuning=True,
                      floor_scale=4, attn_scale=0.1, no_rope_layer_interval=2, use_qk_norm=draw(st.booleans()),
                      moe_layers=[1] if dense_first else None)
    else:  # softmax top-k over small experts, renormalized or not, no shared expert
        config.update(model_type="qwen3_moe", moe_intermediate_size=tp * draw(st.integers(2, 8)),
                      norm_topk_prob=draw(st.booleans()), mlp_only_layers=[0] if dense_first else [])
    n_batch = world // tp // cp  # the CP ranks of a group share its sequences
    lengths = draw(st.lists(st.integers(1, 12), min_size=n_batch, max_size=n_batch + 3))
    seed = draw(st.integers(0, 2**16))
    seqs, labels = random_sequences(lengths, config["vocab_size"], torch.Generator().manual_seed(seed))
    layout = dict(dp_replicate=dp_replicate, dp_shard=-1, cp=cp, tp=tp, ep=ep)
    return world, layout, config, seqs, labels, seed, False, draw(st.sampled_from(["none", "full", "selective"]))


# Each example builds and runs the MoE model on a 4-rank pool in ~2 s; a few examples per run keep the suite's time
# while hypothesis draws fresh layouts every run (tests/test_ep.py pins the acceptance layouts).
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=moe_cases())
def test_any_expert_parallel_layout_matches_single_device(case):
    check_case(case)


def check_case(case, compile_backend=None):
    world, layout, config, seqs, labels, seed, value, ac = case
    results = get_pool(world).run(run_rank, config, layout, seqs, labels, seed, value, ac, compile_backend)
    outs, grads, params, norm = reference(config, seqs, labels, seed, value)
    dims = ParallelDims(**layout).resolve(world, model_config(config))
    for rank, r in enumerate(results):
        # (a) forward outputs of this rank's sequences. A value is one dot product of a unit-RMS
        # hidden state with the head's weights, which can cancel to far below its terms (a value of
        # 0.01 from terms of 0.2): values are compared at the scale of their spread at init,
        # initializer_range * sqrt(hidden_size).
        value_floor = config["initializer_range"] * config["hidden_size"] ** 0.5
        for key, per_seq in r["outs"].items():
            for j, i in enumerate(r["indices"]):
                floor = value_floor if key == "values" else 0.0
                assert rel(per_seq[j], outs[key][i], floor) <= TOL, (rank, key, i)
        # (b) gradients and parameters after one AdamW step, gathered with full_tensor().
        # Some gradients are zero in exact arithmetic (q and k when no labelled token attends to
        # more than one key; k biases up to RoPE), leaving only rounding noise of the backward's
        # magnitudes (~1e-8 of the largest gradient): gradients are compared at no less than 1/10 of
        # the model's largest gradient, so the bound never falls below 1e-6 of it. Adam turns such a gradient's rounding
        # error dg into a step of up to lr * dg / eps, so parameters are compared at the scale of the
        # model's largest parameter (a bias that starts at 0 has no scale of its own).
        grad_floor = 0.1 * max(float(g.abs().max()) for g in grads.values())
        param_floor = max(float(p.abs().max()) for p in params.values())
        for name in grads:
            assert rel(r["grads"][name], grads[name], grad_floor) <= TOL, (rank, "grad", name)
            assert rel(r["params"][name], params[name], param_floor) <= TOL, (rank, "param", name)
        assert abs(r["norm"] - norm) <= TOL * norm
        # (c) every parameter is a DTensor on the expected mesh with the placements the plan promises.
        for name, place in r["placements"].items():
            check_placement(name, place, dims, config)


def expected_tp_placement(name: str, config: dict, tp: int) -> str:
    if name.endswith("norm.weight") or name.startswith("score.") or ".router." in name or name.endswith(".mlp.gate.weight"):
        return "R"
    if ".k_proj." in name or ".v_proj." in name:
        return "S(0)" if config["num_key_value_heads"] % tp == 0 else "R"
    if ".o_proj.weight" in name or ".down_proj.weight" in name:
        return "S(1)"
    if ".o_proj.bias" in name or ".down_proj.bias" in name:
        return "R"
    return "S(0)"  # q/gate/up (weights and biases), embedding and lm_head rows


def check_expert_placement(name: str, place, dims: ParallelDims) -> None:
    """Routed experts: `S(0)` over `ep`, FSDP over `efsdp` (with dp_replicate for HSDP) wherever FSDP runs or TP
    needs their reduction, never on the TP mesh."""
    dp = dims.dp_replicate * dims.dp_shard * dims.cp
    if dims.ep == 1 and dims.tp == 1:  # dense parameters of their layer's FSDP group
        assert place == ((("dp_replicate",) if dims.dp_replicate > 1 else ()) + ("dp_shard_cp",),
                         (("R",) if dims.dp_replicate > 1 else ()) + ("S(0)",)) if dp > 1 else place is None, place
        return
    fsdp = dp > 1 or dims.tp > 1
    expected = (("dp_replicate",) if dims.dp_replicate > 1 else ()) + (("efsdp",) if fsdp else ())
    expected += ("ep",) if dims.ep > 1 else ()
    if not expected:
        assert place is None, (name, place)
        return
    mesh_dims, placements = place
    assert mesh_dims == expected, (name, mesh_dims)
    if dims.ep > 1:
        assert placements[-1] == "S(0)", (name, placements)
    if fsdp:  # FSDP shards dim 0 again (strided when ep has sharded it already)
        f = placements[-2 if dims.ep > 1 else -1]
        assert f == "S(0)" or f.startswith("_S"), (name, placements)


def check_placement(name: str, place, dims: ParallelDims, config: dict) -> None:
    if ".experts." in name:
        return check_expert_placement(name, place, dims)
    dp = dims.dp_replicate * dims.dp_shard * dims.cp  # FSDP shards over dp_shard x cp
    if dp == 1 and dims.tp == 1:
        assert place is None, (name, place)
        return
    mesh_dims, placements = place
    expected_dims = (("dp_replicate",) if dims.dp_replicate > 1 else ()) + (("dp_shard_cp",) if dp > 1 else ())
    expected_dims += ("tp",) if dims.tp > 1 else ()
    assert mesh_dims == expected_dims, (name, mesh_dims)
    if dims.dp_replicate > 1:
        assert placements[0] == "R", (name, placements)
    if dp > 1:
        fsdp = placements[1 if dims.dp_replicate > 1 else 0]
        assert fsdp in ("S(0)",) or fsdp.startswith("_S(0"), (name, placements)  # FSDP shards dim 0
    if dims.tp > 1:
        assert placements[-1] == expected_tp_placement(name, config, dims.tp), (name, placements)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(world=st.sampled_from([2, 4]), heads=st.sampled_from([(6, 3), (9, 3), (4, 4), (6, 2)]),
       tp=st.sampled_from([3, 4, 5, 8]), dp_shard=st.sampled_from([-1, 1, 3]))
def test_invalid_layouts_raise_before_any_collective(world, heads, tp, dp_shard):
    config = dtllama.ModelConfig(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=heads[0], num_key_value_heads=heads[1], head_dim=4)
    dims = ParallelDims(dp_shard=dp_shard, tp=tp)
    valid = tp in valid_tp_degrees(config) and (world % tp == 0) and (dp_shard == -1 or dp_shard * tp == world)
    assume(not valid)
    with pytest.raises(ValueError, match=r"tp=|world size|dp_shard"):
        dims.resolve(world, config)
    # The same layout on a live pool: every rank stops at validation with the same message, so no
    # rank is left waiting in a collective (the pool would time out).
    messages = get_pool(world).run(validate_rank, dataclasses.asdict(config), dict(dp_shard=dp_shard, tp=tp))
    assert all(m is not None and m == messages[0] for m in messages), messages

