"""Head options of the causal LM's fused log-prob head: one temperature per sequence (a rollout samples each request
at its own) equals each sequence run alone at its scalar temperature, and the top-k log-probs of every position equal
`torch.topk` of the full log-softmax (values, ids, gradients), in the op and the model, on TP and CP too."""

from __future__ import annotations

import pytest
import torch
from helpers import head_inputs, rel_err
from head_cases import temperature_rank, topk_rank
from parallel_cases import random_sequences
from pool import get_pool

import dtllama
from dtllama.ops import cu_seqlens_from_lengths, linear_logprobs_entropy, linear_topk_logprobs, shift_labels

CONFIG = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.2,
              torch_dtype="float32")
TOL = 1e-6  # fp32: the same products scaled before rather than inside the row statistics


@pytest.mark.parametrize("save_bytes", [0, 2**30], ids=["recomputed", "kept"])
def test_per_token_temperature_in_the_op_is_the_log_softmax_of_scaled_logits(save_bytes):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**16, ())))
    T = 37
    hidden, weight, labels = head_inputs(g, T, 16, 53)
    labels[::7] = -100
    temp = 0.5 + 1.5 * torch.rand(T, generator=g)
    lp, ent = linear_logprobs_entropy(hidden, weight, labels, temp, chunk_size=8, save_bytes=save_bytes)
    logp = torch.log_softmax((hidden @ weight.t()) / temp[:, None], -1)
    valid = labels != -100
    ref_lp = torch.where(valid, logp.gather(1, labels.clamp_min(0)[:, None]).squeeze(1), 0.0)
    ref_ent = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    assert rel_err(lp, ref_lp.detach()) <= TOL and rel_err(ent, ref_ent.detach()) <= TOL
    grads = torch.autograd.grad((lp + 0.3 * ent).sum(), (hidden, weight))
    ref_grads = torch.autograd.grad((ref_lp + 0.3 * ref_ent).sum(), (hidden, weight))
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(grads, ref_grads))


def test_per_sequence_temperature_equals_each_sequence_at_its_own():
    model = dtllama.LlamaForCausalLM(dtllama.ModelConfig(**CONFIG))
    model.init_weights(seed=int(torch.randint(0, 2**16, ())))
    seqs, _ = random_sequences([9, 1, 14, 6], CONFIG["vocab_size"], torch.Generator().manual_seed(3))
    temps = [0.6, 1.0, 1.7, 0.9]
    ids, cu = torch.cat(seqs), cu_seqlens_from_lengths([len(s) for s in seqs])
    out = model(ids, cu_seqlens=cu, labels=shift_labels(ids, cu), temperature=torch.tensor(temps))
    (out.logprobs.sum() + 0.3 * out.entropy.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone_lp, alone_ent = [], []
    for s, t in zip(seqs, temps):
        c = cu_seqlens_from_lengths([len(s)])
        o = model(s, cu_seqlens=c, labels=shift_labels(s, c), temperature=t)
        (o.logprobs.sum() + 0.3 * o.entropy.sum()).backward()
        alone_lp.append(o.logprobs.detach())
        alone_ent.append(o.entropy.detach())
    assert rel_err(out.logprobs, torch.cat(alone_lp)) <= TOL and rel_err(out.entropy, torch.cat(alone_ent)) <= TOL
    for n, p in model.named_parameters():
        assert rel_err(grads[n], p.grad, floor=1e-3) <= 1e-5, n
    padded = model(torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True),
                   attention_mask=torch.nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.bool) for s in seqs],
                                                                  batch_first=True),
                   temperature=torch.tensor(temps)).logits  # one per row of a padded batch; logits take it too
    alone = model(seqs[2], cu_seqlens=cu_seqlens_from_lengths([14]), temperature=1.7).logits
    assert rel_err(padded[2, :14], alone) <= TOL
    with pytest.raises(ValueError, match=r"temperature of shape \(3,\): pass a float or one per sequence \[4\]"):
        model(ids, cu_seqlens=cu, labels=shift_labels(ids, cu), temperature=torch.ones(3))


@pytest.mark.parametrize("world, layout", [(2, dict(tp=2)), (2, dict(cp=2)), (4, dict(cp=2, tp=2))],
                         ids=["tp2", "cp2", "cp2xtp2"])
def test_per_sequence_temperature_under_tp_and_cp_equals_one_device(world, layout):
    seed = int(torch.randint(0, 2**16, ()))
    seqs, _ = random_sequences([11, 7, 14], CONFIG["vocab_size"], torch.Generator().manual_seed(seed))
    temps = [0.7, 1.3, 2.0]
    ref_lp, ref_ent, ref_grads = temperature_rank(CONFIG, None, seqs, temps, seed)
    for lp, ent, grads in get_pool(world).run(temperature_rank, CONFIG, dict(layout, dp_shard=1), seqs, temps, seed):
        assert rel_err(lp, ref_lp) <= 1e-5 and rel_err(ent, ref_ent) <= 1e-5
        for name, ref in ref_grads.items():
            assert rel_err(grads[name], ref, floor=1e-3) <= 1e-5, name


@pytest.mark.parametrize("per_token", [False, True], ids=["scalar-temperature", "per-token-temperature"])
def test_topk_logprobs_are_torch_topk_of_the_full_log_softmax(per_token):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**16, ())))
    T, H, V, k = 29, 16, 47, 5
    hidden = torch.randn(T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    temp = (0.5 + torch.rand(T, generator=g)) if per_token else 0.8
    values, ids = linear_topk_logprobs(hidden, weight, k, temp, chunk_size=8)
    t = temp[:, None] if per_token else temp
    ref_values, ref_ids = torch.log_softmax(hidden @ weight.t() / t, -1).topk(k, -1)
    assert torch.equal(ids, ref_ids) and rel_err(values, ref_values.detach()) <= TOL
    w = torch.rand(T, k, generator=g)
    grads = torch.autograd.grad((values * w).sum(), (hidden, weight))
    ref_grads = torch.autograd.grad((ref_values * w).sum(), (hidden, weight))
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(grads, ref_grads))
    with pytest.raises(ValueError, match="k=48 must be in 1..vocab size 47"):
        linear_topk_logprobs(hidden, weight, 48)


@pytest.mark.parametrize("world, layout", [(2, dict(tp=2)), (2, dict(cp=2))], ids=["tp2", "cp2"])
def test_topk_logprobs_under_tp_and_cp_equal_one_device(world, layout):
    seed = int(torch.randint(0, 2**16, ()))
    seqs, _ = random_sequences([11, 7, 14], CONFIG["vocab_size"], torch.Generator().manual_seed(seed))
    ref_values, ref_ids, ref_grads = topk_rank(CONFIG, None, seqs, 4, seed)
    full = torch.log_softmax(dtllama_logits(seqs, seed), -1).topk(4, -1)
    assert torch.equal(ref_ids, full.indices) and rel_err(ref_values, full.values) <= TOL  # the model's own
    for values, ids, grads in get_pool(world).run(topk_rank, CONFIG, dict(layout, dp_shard=1), seqs, 4, seed):
        assert torch.equal(ids, ref_ids) and rel_err(values, ref_values) <= 1e-5
        for name, ref in ref_grads.items():
            assert rel_err(grads[name], ref, floor=1e-3) <= 1e-5, name


def dtllama_logits(seqs, seed: int) -> torch.Tensor:
    """The full logits of the packed sequences on one process (the model initialized as the layouts are)."""
    model = dtllama.LlamaForCausalLM(dtllama.ModelConfig(**CONFIG))
    model.init_weights(seed)
    with torch.no_grad():
        return model(torch.cat(seqs), cu_seqlens=cu_seqlens_from_lengths([len(s) for s in seqs])).logits
