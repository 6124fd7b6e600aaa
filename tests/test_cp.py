"""Ulysses context parallelism: every layout with `cp > 1` gives the single-device fp32 numbers.

The acceptance layouts of the issue, each on a fresh random packed batch whose sequences cross the CP
shard boundaries, with a sequence of length 1 and a token count that `pad_to_multiple` must pad; the
label at a shard boundary; KV-head mapping under GQA; per-block compile; bad layouts and batches.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from fault_cases import CONFIG, backward_all_to_alls, run_bad_cp_batch
from helpers import rel_err
from parallel_cases import (BOUNDARY_CONFIG, build, cp_boundary_logprobs, cp_gather, gathered_loss_grads,
                            random_sequences, validate_rank)
from pool import get_pool
from test_parallel_properties import TOL, check_case

import dtllama
from dtllama.ops import IGNORE_INDEX, cu_seqlens_from_lengths, pad_to_multiple, shift_labels
from dtllama.parallel import ParallelDims, parallelize, valid_cp_degrees

# Lengths sum to 31: not a multiple of 2 or 4 (padded to 32). Every shard boundary of every layout below
# falls inside a sequence (cp=4: 8 in the 9, 16 in the 12, 24 in the 8; dp_shard=2 deals [9, 12, 1] and
# [1, 8], split at 11 and 5), and two sequences have a single token.
LENGTHS = [9, 1, 12, 8, 1]


def make_case(world: int, layout: dict, heads: tuple[int, int], value: bool, ac: str = "none"):
    """A case in the form of the property tests' `cases()`, with fresh random tokens and weights."""
    seed = int(torch.randint(0, 2**16, ()))
    g = torch.Generator().manual_seed(seed)
    tp = layout.get("tp", 1)
    config = dict(vocab_size=61, hidden_size=32, intermediate_size=8 * tp, num_hidden_layers=2,
                  num_attention_heads=heads[0], num_key_value_heads=heads[1], head_dim=8, tie_word_embeddings=False,
                  rms_norm_eps=1e-5, rope_theta=1e4, initializer_range=0.2, torch_dtype="float32")
    seqs, labels = random_sequences(LENGTHS, config["vocab_size"], g)
    return world, dict(layout, dp_shard=layout.get("dp_shard", -1)), config, seqs, labels, seed, value, ac


ACCEPTANCE = [  # (world, layout, (query heads, KV heads), activation checkpointing)
    (2, dict(cp=2), (4, 2), "none"),  # one KV head per CP rank
    (4, dict(cp=4), (8, 2), "selective"),  # 2 KV heads over 4 ranks: each repeated twice
    (4, dict(cp=2, tp=2), (8, 4), "none"),  # 2 KV heads per TP rank, one per CP rank
    (4, dict(cp=2, dp_shard=2), (6, 2), "full"),
    (4, dict(cp=2, tp=2), (4, 1), "none"),  # one KV head: replicated over tp, then repeated over cp
]


@pytest.mark.parametrize("value", [False, True], ids=["logprobs", "values"])
@pytest.mark.parametrize("world, layout, heads, ac", ACCEPTANCE, ids=lambda x: str(x).replace(" ", ""))
def test_context_parallel_matches_single_device(world, layout, heads, ac, value):
    """Outputs (log-probs, entropy, logits or values), gradients, one AdamW step and the grad norm, all
    within fp32 rounding of the single-device model (check_case states each tolerance). The GQA cases check
    the KV-head mapping: a query head reading another group's KV head would be off by O(1)."""
    check_case(make_case(world, layout, heads, value, ac))


@pytest.mark.parametrize("world, layout, ac", [(2, dict(cp=2), "full"), (4, dict(cp=2, tp=2), "selective"),
                                               (4, dict(cp=2, dp_shard=2), "none")])
def test_compiled_context_parallel_blocks_match_single_device(world, layout, ac):
    """Per-block compile (aot_eager, as the property tests: AOTAutograd traces the all-to-alls inside each
    block) with activation checkpointing."""
    check_case(make_case(world, layout, (4, 2), False, ac), compile_backend="aot_eager")


def test_selective_checkpointing_keeps_the_all_to_alls():
    """Backward runs the reverse of each layer's 4 all-to-alls (q, k, v in, the output back). Selective AC
    saves the forward ones (parallel/ac.py) so it adds none; full AC recomputes all 4 per layer."""
    seed, layers = int(torch.randint(0, 2**16, ())), CONFIG["num_hidden_layers"]
    counts = {ac: get_pool(2).run(backward_all_to_alls, ac, seed) for ac in ("none", "selective", "full")}
    assert counts == {"none": [4 * layers] * 2, "selective": [4 * layers] * 2, "full": [8 * layers] * 2}, counts


def test_label_at_a_shard_boundary_is_the_first_token_of_the_next_shard():
    """One sequence over 4 CP shards: the log-prob read at the last token of shards 0..2 is that of the
    next shard's first token, as on one device (an implementation that shifted labels per shard would
    read an ignored or wrong label there)."""
    seed, T = int(torch.randint(0, 2**16, ())), 16
    results = get_pool(4).run(cp_boundary_logprobs, T, seed, 4)
    reference = cp_boundary_logprobs(T, seed, 1)
    boundaries = [T // 4 * k - 1 for k in (1, 2, 3)]
    for got in results:
        assert torch.all(got[boundaries] != 0)  # real labels there, not ignored ones
        # 2 layers of fp32 with the same reductions in another order: ~1e-7, far inside 1e-5.
        assert rel_err(got, reference) <= TOL


# Packed token counts 16 and 13 (padded to 16): cp=2 cuts at 8, cp=4 at 4, 8, 12. In EDGE_LENGTHS[0] the cuts at 4
# and 8 fall exactly between sequences (one of them a single token) and 12 inside one; in [1] all fall inside.
EDGE_LENGTHS = [[4, 3, 1, 5, 3], [5, 6, 2]]
_EDGE_DIMS: dict = {}


def cp_packed_outputs(lengths: list[int], seed: int, cp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy of random packed sequences of `lengths` (next-token labels, shifted before sharding
    by `shift_labels`, padded to a multiple of `cp`) on `cp` CP ranks, gathered to every real token."""
    config = dtllama.ModelConfig(**BOUNDARY_CONFIG)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (sum(lengths),), generator=g)
    if cp not in _EDGE_DIMS:
        _EDGE_DIMS[cp] = ParallelDims(cp=cp).resolve(dist.get_world_size(), config)
        _EDGE_DIMS[cp].build_mesh("cpu")
    with torch.device("meta"):
        model = build(config, value=False)
    parallelize(model, _EDGE_DIMS[cp])
    model.to_empty(device="cpu")
    model.init_weights(seed)
    cu = cu_seqlens_from_lengths(lengths)
    b = pad_to_multiple(ids, cu, cp, shift_labels(ids, cu))
    with torch.no_grad():
        out = model(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen, labels=b.labels)
    mesh = _EDGE_DIMS[cp].mesh("cp")
    return cp_gather(out.logprobs, mesh)[: ids.numel()], cp_gather(out.entropy, mesh)[: ids.numel()]


def padded_outputs(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same sequences as a padded `[B, S]` batch with an attention mask (odd rows left-padded, labels the next
    token of the row, -100 after its last) on one device: log-probs and entropy at the real tokens in sequence
    order, and the labels there."""
    config = dtllama.ModelConfig(**BOUNDARY_CONFIG)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (sum(lengths),), generator=g)
    model = build(config, value=False)
    model.init_weights(seed)
    S = max(lengths) + 2
    x = torch.zeros(len(lengths), S, dtype=torch.long)
    labels = torch.full_like(x, IGNORE_INDEX)
    mask = torch.zeros_like(x, dtype=torch.bool)
    for row, seq in enumerate(ids.split(lengths)):
        at = S - len(seq) if row % 2 else 0
        x[row, at: at + len(seq)], mask[row, at: at + len(seq)] = seq, True
        labels[row, at: at + len(seq) - 1] = seq[1:]
    with torch.no_grad():
        out = model(x, attention_mask=mask, labels=labels)
    return out.logprobs[mask], out.entropy[mask], labels[mask]


@pytest.mark.parametrize("lengths", EDGE_LENGTHS, ids=["cuts-between-sequences", "cuts-inside-sequences"])
def test_packed_logprobs_at_every_cp_shard_edge_equal_the_padded_batch(lengths):
    """cp=2 and cp=4 over packed sequences give, at every token and so at each shard edge, the log-probs and
    entropy of the padded `[B, S]` batch with its mask on one device (verl #6068: an edge token keeps its label;
    #6475: a sequence's last token never reads the next one's first, its log-prob is 0)."""
    seed = int(torch.randint(0, 2**16, ()))
    lp_ref, ent_ref, labels = padded_outputs(lengths, seed)
    ends = torch.tensor(lengths).cumsum(0) - 1
    assert torch.all(labels[ends] == IGNORE_INDEX) and torch.all(lp_ref[ends] == 0)
    for cp in (2, 4):
        shard = -(-sum(lengths) // cp)  # tokens per CP rank once padded to a multiple of cp
        edges = [shard * k - 1 for k in range(1, cp) if shard * k < sum(lengths)]
        for lp, ent in get_pool(cp).run(cp_packed_outputs, lengths, seed, cp):
            assert rel_err(lp, lp_ref) <= TOL and rel_err(ent, ent_ref) <= TOL, (cp, lp, lp_ref)
            # the last token of each shard: its label is the next shard's first token unless a sequence ends there
            for e in edges:
                if e not in ends.tolist():
                    assert labels[e] != IGNORE_INDEX and lp[e] != 0, (cp, e)
                else:
                    assert lp[e] == 0, (cp, e)


def test_valid_cp_degrees_follow_the_heads():
    config = dtllama.ModelConfig(vocab_size=64, hidden_size=72, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=9, num_key_value_heads=3, head_dim=8)  # SmolLM2's heads
    assert valid_cp_degrees(config) == [1, 3, 9]
    assert valid_cp_degrees(config, tp=3) == [1, 3]  # one KV head per TP rank, repeated 3 times
    config = dataclasses.replace(config, num_attention_heads=8, num_key_value_heads=2)
    assert valid_cp_degrees(config, tp=2) == [1, 2, 4]


@pytest.mark.parametrize("world, layout, heads, message", [
    (4, dict(cp=4), (6, 2), "cp=4 with tp=1 does not fit num_attention_heads=6, num_key_value_heads=2 "
                            "(Ulysses gives each of the tp*cp=4 ranks whole heads); choose cp in [1, 2, 6] for tp=1"),
    (4, dict(cp=2, tp=2), (2, 2), "cp=2 with tp=2 does not fit num_attention_heads=2, num_key_value_heads=2 "
                                  "(Ulysses gives each of the tp*cp=4 ranks whole heads); choose cp in [1] for tp=2"),
    (2, dict(cp=2), (6, 3), "cp=2 with tp=1 does not fit num_attention_heads=6, num_key_value_heads=3 "
                            "(Ulysses gives each of the tp*cp=2 ranks whole heads); choose cp in [1, 3, 6] for tp=1"),
])
def test_bad_cp_layouts_raise_before_any_collective(world, layout, heads, message):
    config = dtllama.ModelConfig(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=heads[0], num_key_value_heads=heads[1], head_dim=4)
    """Query heads not divisible by cp (6 over 4), tp*cp above the query heads (2 over 4), KV heads that
    neither split over cp nor divide it (3 over 2)."""
    messages = get_pool(world).run(validate_rank, dataclasses.asdict(config), layout)
    with pytest.raises(ValueError) as e:
        ParallelDims(**layout).resolve(world, config)
    assert str(e.value) == message
    assert messages == [message] * world  # every rank stops at validation with the same message


# A bad rank must not leave its peers in a collective (the pool would time out after 120 s); the check
# is two small collectives and a tiny forward on a loaded 2-core CPU.
PROMPT_SECONDS = 10.0


@pytest.mark.parametrize("fault, expected", [
    ("padded", "context parallelism (cp=2) takes packed [T] input_ids with cu_seqlens, got shape (3, 6)"),
    ("unpadded", "13 packed tokens do not split over tp*cp=2 ranks; pad them with dtllama.ops.pad_to_multiple"),
])
@pytest.mark.parametrize("bad_ranks", [[0], [0, 1]], ids=["one-rank", "all-ranks"])
def test_bad_cp_batch_raises_the_same_error_on_every_rank(fault, expected, bad_ranks):
    results = get_pool(2).run(run_bad_cp_batch, fault, bad_ranks, int(torch.randint(0, 2**16, ())))
    messages = [m for m, _ in results]
    assert messages[0] is not None and all(m == messages[0] for m in messages), messages
    assert expected in messages[0], messages[0]
    assert max(s for _, s in results) < PROMPT_SECONDS, results
    assert all(m is None for m, _ in get_pool(2).run(run_bad_cp_batch, None, [], 3))  # the pool stays usable


def test_gathered_tokens_give_whole_sequence_losses_the_one_device_gradients():
    """`gather_tokens` (what the PPO recipe's CP path uses): every CP rank computes a loss over whole sequences
    from all ranks' log-probs, and its backward sends each rank only its own tokens' gradient, so FSDP's
    reduction gives the one-device gradients (a backward that summed the ranks' copies would double them)."""
    world, layout, config, seqs, labels, seed, _, _ = make_case(2, dict(cp=2), (4, 2), False)
    ref_loss, ref = gathered_loss_grads(config, None, seqs, labels, seed)
    for loss, grads in get_pool(world).run(gathered_loss_grads, config, layout, seqs, labels, seed):
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
        errs = {n: rel_err(grads[n], g) for n, g in ref.items()}
        worst = max(errs, key=errs.get)
        assert errs[worst] <= TOL, (worst, errs[worst])
