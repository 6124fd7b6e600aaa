"""The numerics RL and SFT users hit (verl #1381, #2656, #6068, #6475): the fused heads at huge and all-negative
logits against float64; a micro-batch whose labels or loss mask are all off contributes nothing and breaks nothing;
a step's token-mean loss and gradients do not depend on how its sequences are cut into micro-batches."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

import dtllama
from dtllama.ops import CrossEntropy, cu_seqlens_from_lengths, linear_cross_entropy, linear_logprobs_entropy
from dtllama.ops import shift_labels
from dtllama.train import rl


def _reference(hidden, weight, labels):
    """float64 log-probs, entropy and mean cross-entropy of the fp32 inputs."""
    z = hidden.double() @ weight.double().t()
    logp = torch.log_softmax(z, -1)
    valid = labels != -100
    lp = torch.where(valid, logp.gather(1, labels.clamp_min(0)[:, None]).squeeze(1), 0.0)
    ent = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    return lp, ent, -lp.sum() / valid.sum(), z


@pytest.mark.parametrize("kind", ["huge", "all-negative"])
def test_fused_heads_at_extreme_logits_match_float64(kind):
    """|logit| ~ 1e4 (a diverging policy) and every logit below -1e3: the row max is taken out first, so nothing
    overflows; the fp32 logits themselves carry ~1e-3 of rounding at that size, the bound's scale."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**16, ())))
    T, H, V = 29, 16, 41
    hidden = torch.randn(T, H, generator=g) * 30
    weight = torch.randn(V, H, generator=g) * 30
    if kind == "all-negative":
        hidden, weight = hidden.abs(), -weight.abs() - 1.0
    labels = torch.randint(0, V, (T,), generator=g)
    labels[::4] = -100
    hidden.requires_grad_()
    weight.requires_grad_()
    ref_lp, ref_ent, ref_loss, z = _reference(hidden, weight, labels)
    z = z.detach()
    assert float(z.abs().max()) > 1e3 and (kind == "huge" or float(z.max()) < -1e3)
    lp, ent = linear_logprobs_entropy(hidden, weight, labels, 1.0, 8)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    scale = 1e-6 * float(z.abs().max())  # a few fp32 ulps of the logits
    for got, want in ((lp, ref_lp), (ent, ref_ent), (loss, ref_loss)):
        assert bool(torch.isfinite(got).all()) and float((got.double() - want).abs().max()) <= 10 * scale
    grads = torch.autograd.grad(lp.sum() + ent.sum(), (hidden, weight))
    ref_grads = torch.autograd.grad((ref_lp.sum() + ref_ent.sum()), (hidden, weight))
    assert all(bool(torch.isfinite(a).all()) and rel_err(a.double(), b, floor=1.0) <= 1e-3
               for a, b in zip(grads, ref_grads))


def test_an_all_masked_micro_batch_contributes_nothing_and_breaks_nothing():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**16, ())))
    hidden = torch.randn(9, 8, generator=g, requires_grad=True)
    weight = torch.randn(13, 8, generator=g, requires_grad=True)
    none = torch.full((9,), -100)
    for opt in (CrossEntropy(), CrossEntropy(normalizer=5.0, z_loss=1e-2, label_smoothing=0.1)):
        loss = linear_cross_entropy(hidden, weight, none, opt, 4)
        grads = torch.autograd.grad(loss, (hidden, weight))
        assert float(loss) == 0.0 and all(bool((x == 0).all()) for x in grads)
    lp, ent = linear_logprobs_entropy(hidden, weight, none, 0.7, 4)
    grads = torch.autograd.grad(lp.sum() + ent.sum(), (hidden, weight))
    assert bool((lp == 0).all() and (ent == 0).all()) and all(bool((x == 0).all()) for x in grads)
    # RL: a micro-batch of prompts only (no response token) under the step's global normalizer, every mode
    logprobs = torch.randn(9, generator=g, requires_grad=True)
    mask, cu = torch.zeros(9), cu_seqlens_from_lengths([4, 5])
    for agg in rl.AGG_MODES:
        pg, metrics = rl.policy_loss(logprobs, logprobs.detach() - 0.1, torch.randn(9, generator=g), mask, agg=agg,
                                     cu_seqlens=cu, normalizer=17.0)
        vf, vmetrics = rl.value_loss(logprobs, logprobs.detach(), torch.randn(9, generator=g), mask, agg=agg,
                                     cu_seqlens=cu, normalizer=17.0)
        for x in (pg, vf):
            (grad,) = torch.autograd.grad(x, logprobs)
            assert float(x) == 0.0 and bool((grad == 0).all()), agg
        assert all(v == v for v in {**metrics, **vmetrics}.values()), metrics  # no NaN in what is logged either
    with pytest.raises(ValueError, match="or pass the step's global normalizer"):  # a mean of nothing
        rl.policy_loss(logprobs, logprobs.detach(), torch.randn(9, generator=g), mask)


def test_token_mean_over_micro_batches_equals_the_whole_batch():
    """The loop's loss: each micro-batch's summed cross-entropy over the step's global count of loss tokens; cut
    into 1, 2 or 4 micro-batches the loss and every gradient are the same (fp32 sums in another order)."""
    config = dtllama.ModelConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.2)
    model = dtllama.LlamaForCausalLM(config)
    model.init_weights(int(torch.randint(0, 2**16, ())))
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 53, (n,), generator=g) for n in (7, 12, 3, 9)]
    n_global = sum(len(s) - 1 for s in seqs)
    results = []
    for cuts in ([4], [2, 2], [1, 1, 1, 1]):
        model.zero_grad()
        total, i = 0.0, 0
        for n in cuts:
            part = seqs[i:i + n]
            i += n
            ids, cu = torch.cat(part), cu_seqlens_from_lengths([len(s) for s in part])
            out = model(ids, cu_seqlens=cu, labels=shift_labels(ids, cu), loss=CrossEntropy(normalizer=n_global))
            out.loss.backward()
            total += float(out.loss)
        results.append((total, {k: p.grad.clone() for k, p in model.named_parameters()}))
    for total, grads in results[1:]:
        assert abs(total - results[0][0]) <= 1e-6 * results[0][0]
        assert all(rel_err(grads[k], results[0][1][k], floor=1e-3) <= 1e-5 for k in grads)
