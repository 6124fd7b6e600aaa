"""Expert parallelism: every layout with `ep > 1` gives the single-device fp32 numbers of the Llama 4 MoE model.

The acceptance layouts of the issue, each on a fresh random packed batch dealt over the data-parallel ranks (each
rank routes its own tokens, and the experts of a layer live on other ranks): outputs of each rank's sequences,
full gradients (`full_tensor()`), one AdamW step and the grad norm against the single-device model; the experts'
placements; the dispatch's row order; bad `ep` degrees refused on every rank before any collective.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from parallel_cases import aux_loss_rank, random_sequences, resume_losses, validate_rank
from pool import get_pool
from test_parallel_properties import check_case

from dtllama.models.llama4 import Llama4Config
from dtllama.models.llama import ModelConfig
from dtllama.parallel import ParallelDims, valid_ep_degrees
from dtllama.parallel.ep import _group_by_expert

# 7 sequences, 45 tokens: every data-parallel rank of every layout below gets some, and with top-2 routing over
# 4 experts each rank sends rows to every other rank of its EP group.
LENGTHS = [9, 1, 12, 8, 5, 3, 7]


def moe_config(tp: int = 1, moe_layers=None, experts: int = 4, top_k: int = 2) -> dict:
    """A tiny Llama 4: chunked attention (chunks of 4), a NoPE layer with temperature tuning, qk norm, top-k
    routing; `moe_layers=[1]` makes layer 0 a dense SwiGLU (Maverick's interleave)."""
    return dict(model_type="llama4_text", vocab_size=61, hidden_size=32, intermediate_size=8 * tp,
                intermediate_size_mlp=12 * tp, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4, attention_chunk_size=4, attn_temperature_tuning=True,
                floor_scale=4, attn_scale=0.1, no_rope_layer_interval=2, use_qk_norm=True,
                num_local_experts=experts, num_experts_per_tok=top_k, moe_layers=moe_layers,
                tie_word_embeddings=False, initializer_range=0.2, torch_dtype="float32")


def make_case(world: int, layout: dict, config: dict, ac: str = "none"):
    """A case in the form of the property tests' `cases()`, with fresh random tokens and weights."""
    seed = int(torch.randint(0, 2**16, ()))
    seqs, labels = random_sequences(LENGTHS, config["vocab_size"], torch.Generator().manual_seed(seed))
    return world, dict(layout, dp_shard=layout.get("dp_shard", -1)), config, seqs, labels, seed, False, ac


ACCEPTANCE = [  # (world, layout, config, activation checkpointing)
    (2, dict(ep=2), moe_config(), "none"),  # dp_shard=2: one EP group of both ranks, no expert FSDP
    (4, dict(ep=2), moe_config(moe_layers=[1]), "selective"),  # dp_shard=4: 2 EP groups, experts FSDP over 2
    (4, dict(ep=4), moe_config(top_k=1), "full"),  # one expert per rank
    (4, dict(ep=2, tp=2), moe_config(tp=2), "none"),  # dp_shard=2: the EP group is the TP group
    (4, dict(ep=2, dp_replicate=2), moe_config(), "none"),  # HSDP: experts replicated over dp_replicate
    (4, dict(tp=2), moe_config(tp=2, moe_layers=[1]), "none"),  # ep=1 under TP: experts FSDP over the TP ranks
    # Ulysses: chunk boundaries from the global cu_seqlens, temperatures from each shard's positions.
    (2, dict(cp=2), moe_config(moe_layers=[1]), "none"),
    (4, dict(cp=2, ep=2), moe_config(), "selective"),  # dp_shard=2: EP over the CP ranks' distinct tokens
    (4, dict(cp=2, tp=2), moe_config(tp=2), "none"),  # one KV head per TP rank, repeated for cp=2
]


@pytest.mark.parametrize("world, layout, config, ac", ACCEPTANCE, ids=lambda x: str(x).replace(" ", "")
                         if not isinstance(x, dict) or "model_type" not in x else "moe")
def test_expert_parallel_matches_single_device(world, layout, config, ac):
    """Log-probs, entropy, logits of each rank's sequences, gradients, one AdamW step and the grad norm, within
    fp32 rounding of the single-device model (check_case states each tolerance). A row returned to the wrong
    token, or an expert's gradient summed over the wrong ranks, would be off by O(1)."""
    check_case(make_case(world, layout, config, ac))


@pytest.mark.parametrize("world, layout, config, ac", [
    (4, dict(ep=2, tp=2), moe_config(tp=2, moe_layers=[1]), "selective"),
    (4, dict(ep=4), moe_config(), "full"),
], ids=["ep2-tp2-selective", "ep4-full"])
def test_compiled_expert_parallel_blocks_match_single_device(world, layout, config, ac):
    """Per-block compile (aot_eager, as the property tests): the dense layer whole, the MoE layer's norms,
    attention and shared expert each (`apply_moe_compile`), the routed experts eager between their all-to-alls."""
    check_case(make_case(world, layout, config, ac), compile_backend="aot_eager")


def test_group_by_expert_orders_rows_by_local_expert_then_source():
    """Rows received from 2 ranks for 3 local experts, `recv[s, l]` each, regrouped expert-major."""
    recv = torch.tensor([[2, 0, 1], [1, 2, 0]])  # rank 0 sent a a | - | b ; rank 1 sent c | d d | -
    assert _group_by_expert(recv, 6).tolist() == [0, 1, 3, 4, 5, 2]  # expert 0: a a c; expert 1: d d; expert 2: b


def test_valid_ep_degrees_divide_the_experts_and_the_token_ranks():
    config = Llama4Config(**moe_config(experts=8))
    assert valid_ep_degrees(config, dp_shard=4) == [1, 2, 4]
    assert valid_ep_degrees(config, dp_shard=2, tp=4) == [1, 2, 4, 8]
    assert valid_ep_degrees(dataclasses.replace(config, num_local_experts=6), dp_shard=4) == [1, 2]


DENSE = dict(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=4)


@pytest.mark.parametrize("world, layout, config, message", [
    (4, dict(ep=3), moe_config(experts=6), "ep=3 does not fit num_local_experts=6 over dp_shard*cp*tp=4 ranks "
                                           "(dp_shard=4, cp=1, tp=1; ep must divide both); choose ep in [1, 2]"),
    (4, dict(ep=4), moe_config(experts=2), "ep=4 does not fit num_local_experts=2 over dp_shard*cp*tp=4 ranks "
                                           "(dp_shard=4, cp=1, tp=1; ep must divide both); choose ep in [1, 2]"),
    (4, dict(ep=4, dp_replicate=2), moe_config(), "ep=4 does not fit num_local_experts=4 over dp_shard*cp*tp=2 "
                                                  "ranks (dp_shard=2, cp=1, tp=1; ep must divide both); "
                                                  "choose ep in [1, 2]"),
    (2, dict(ep=2), dict(DENSE), "ep=2 needs a mixture-of-experts model; this ModelConfig has no MoE layer: use ep=1"),
    (2, dict(ep=0), moe_config(), "ep=0 must be a positive integer"),
])
def test_bad_ep_degrees_raise_before_any_collective(world, layout, config, message):
    """ep not dividing the experts (3 of 6), more EP ranks than experts, ep beyond dp_shard*cp*tp (HSDP keeps
    dp_replicate out of it), ep on a dense model: the same message on every rank, at validation."""
    model_config = Llama4Config(**config) if "model_type" in config else ModelConfig(**config)
    with pytest.raises(ValueError) as e:
        ParallelDims(**layout).resolve(world, model_config)
    assert str(e.value) == message
    assert get_pool(world).run(validate_rank, config, layout) == [message] * world


def test_checkpoint_saved_at_ep2_resumes_at_ep1_with_the_same_next_losses(tmp_path):
    """DCP reshards the experts from `Shard(0)` over ep (FSDP-strided over efsdp) to plain FSDP: model and AdamW
    state. Step 2's loss checks the weights, step 3's the optimizer state too (a moment loaded to the wrong
    expert would move its weights elsewhere)."""
    world, layout, config, seqs, labels, seed, _, _ = make_case(4, dict(ep=2), moe_config())
    folder = str(tmp_path / "ckpt")
    saved = get_pool(world).run(resume_losses, config, layout, seqs, labels, seed, folder, True)
    resumed = get_pool(world).run(resume_losses, config, dict(dp_shard=-1), seqs, labels, seed, folder, False)
    # The same fp32 math summed in another order (expert rows gathered on other ranks): ~1e-7 relative.
    for a, b in zip(saved[0], resumed[0]):
        assert abs(a - b) <= 1e-5 * abs(a), (saved[0], resumed[0])
    assert all(r == saved[0] for r in saved) and all(r == resumed[0] for r in resumed)  # one global loss


@pytest.mark.parametrize("world, layout", [(2, dict(tp=2)), (2, dict(tp=2, ep=2)), (2, dict(cp=2)),
                                           (4, dict(cp=2, tp=2))], ids=["tp2", "tp2-ep2", "cp2", "cp2-tp2"])
def test_load_balance_loss_over_token_shards_is_that_of_all_tokens(world, layout):
    """Sequence parallel and Ulysses deal a batch's tokens over the TP / CP ranks; the load-balance loss and its
    router gradient must still be those of all the tokens on one device (per-shard losses would differ and
    count tp times)."""
    config = dict(moe_config(tp=2), router_aux_loss_coef=0.25)
    seed = int(torch.randint(0, 2**16, ()))
    seqs, _ = random_sequences([11, 7, 14], config["vocab_size"], torch.Generator().manual_seed(seed))  # 32 tokens
    ref_aux, ref_grads = aux_loss_rank(config, None, seqs, seed)
    ranks = get_pool(world).run(aux_loss_rank, config, layout, seqs, seed)
    print(f"aux loss: one device {ref_aux:.8f}, per rank {[a for a, _ in ranks]}")
    for aux, grads in ranks:
        assert abs(aux - ref_aux) <= 1e-6 * abs(ref_aux)
        for name, ref in ref_grads.items():
            assert float(ref.abs().max()) > 0, name
            assert float((grads[name] - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), name


def test_valid_tp_degrees_split_the_dense_layers_of_an_interleaved_moe_model():
    """Maverick-style interleave: TP splits the dense layers' `intermediate_size_mlp` as well as the shared
    expert's `intermediate_size`; an all-MoE model has no dense layer, so its `intermediate_size_mlp` is free."""
    from dtllama.parallel.dims import check_tp, valid_tp_degrees

    interleaved = Llama4Config(**dict(moe_config(moe_layers=[1]), intermediate_size=8, intermediate_size_mlp=10))
    assert valid_tp_degrees(interleaved) == [1, 2]
    with pytest.raises(ValueError) as e:
        check_tp(interleaved, 4)
    assert str(e.value) == ("tp=4 does not fit num_attention_heads=4, num_key_value_heads=2, intermediate_size=8, "
                            "intermediate_size_mlp=10; choose tp in [1, 2]")
    all_moe = Llama4Config(**dict(moe_config(), intermediate_size=8, intermediate_size_mlp=10))
    assert valid_tp_degrees(all_moe) == [1, 2, 4]
