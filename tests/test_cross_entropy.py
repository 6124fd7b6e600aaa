"""The fused SFT / pretraining loss (`dtllama.ops.linear_cross_entropy`, the causal LM's `loss=`): gradients made in
forward equal autograd of `F.cross_entropy` (with z-loss and label smoothing), in the op and the model, under TP
(vocab-parallel), SP and CP; and the log-prob head's `entropy=False`: the default's log-probs and gradients, bitwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from head_cases import loss_rank
from helpers import head_inputs, rel_err
from parallel_cases import random_sequences
from pool import get_pool

from dtllama.ops import CrossEntropy, linear_cross_entropy, linear_logprobs_entropy

CONFIG = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.2,
              torch_dtype="float32")


def reference(hidden, weight, labels, opt: CrossEntropy):
    """The loss as transformers / torch write it: full fp32 logits, `F.cross_entropy` plus the z-loss."""
    z = hidden @ weight.t()
    valid = labels != -100
    ce = F.cross_entropy(z, labels, ignore_index=-100, reduction="sum", label_smoothing=opt.label_smoothing)
    zl = opt.z_loss * (z.logsumexp(-1)[valid] ** 2).sum()
    return (ce + zl) / (valid.sum() if opt.normalizer is None else opt.normalizer)


@pytest.mark.parametrize("opt", [CrossEntropy(), CrossEntropy(z_loss=1e-2), CrossEntropy(label_smoothing=0.1),
                                 CrossEntropy(normalizer=7.0, z_loss=1e-3, label_smoothing=0.2)],
                         ids=["mean", "z-loss", "smoothing", "sum-over-7-all"])
@pytest.mark.parametrize("chunk", [None, 5, 64])
def test_loss_and_gradients_equal_autograd_of_cross_entropy(opt, chunk):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**16, ())))
    T = 37
    hidden, weight, labels = head_inputs(g, T, 16, 53)
    labels[torch.rand(T, generator=g) < 0.3] = -100
    upstream = 0.5 + torch.rand((), generator=g)  # backward scales the gradients made in forward
    loss = linear_cross_entropy(hidden, weight, labels, opt, chunk)
    ref = reference(hidden, weight, labels, opt)
    assert rel_err(loss.detach(), ref.detach()) <= 1e-6
    grads = torch.autograd.grad(loss * upstream, (hidden, weight))
    ref_grads = torch.autograd.grad(ref * upstream, (hidden, weight))
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(grads, ref_grads))


def test_bad_options_and_a_second_backward_are_refused():
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(11, 8)
    loss = linear_cross_entropy(hidden, weight, torch.tensor([1, 2, -100, 3]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):  # the gradients made in forward are used once
        loss.backward()
    with pytest.raises(ValueError, match=r"label_smoothing=1.0 must be in \[0, 1\)"):
        CrossEntropy(label_smoothing=1.0)
    with pytest.raises(ValueError, match="normalizer=0 must be positive"):
        CrossEntropy(normalizer=0)
    with pytest.raises(ValueError, match=r"label 11 is outside the vocabulary \[0, 11\)"):
        linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 11, 3]))


def test_compiled_fullgraph_equals_eager():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**16, ())))
    hidden = torch.randn(19, 8, generator=g, requires_grad=True)
    weight = torch.randn(23, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 23, (19,), generator=g)
    opt = CrossEntropy(z_loss=1e-2)
    f = torch.compile(lambda h, w, y: linear_cross_entropy(h, w, y, opt, 4), fullgraph=True, backend="aot_eager")
    got = f(hidden, weight, labels)
    grads = torch.autograd.grad(got, (hidden, weight))
    ref = linear_cross_entropy(hidden, weight, labels, opt, 4)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    assert rel_err(got, ref.detach()) <= 1e-6 and all(rel_err(a, b) <= 1e-6 for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("save_bytes", [0, 2**30, 12 * 53 * 4], ids=["recomputed", "kept", "some-kept"])
@pytest.mark.parametrize("per_token", [False, True], ids=["scalar-temperature", "per-token-temperature"])
def test_logprobs_without_entropy_are_the_defaults_bitwise(save_bytes, per_token):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**16, ())))
    T = 37
    hidden, weight, labels = head_inputs(g, T, 16, 53)
    labels[::6] = -100
    temp = 0.5 + torch.rand(T, generator=g) if per_token else 0.8
    upstream = torch.randn(T, generator=g)
    runs = []
    for entropy in (True, False):
        lp, ent = linear_logprobs_entropy(hidden, weight, labels, temp, 8, save_bytes=save_bytes, entropy=entropy)
        runs.append((lp.detach(), *torch.autograd.grad((lp * upstream).sum(), (hidden, weight)), ent))
    assert runs[1][3] is None and runs[0][3] is not None
    assert all(torch.equal(a, b) for a, b in zip(runs[0][:3], runs[1][:3]))


def _check_layout(world, layout, options):
    seed = int(torch.randint(0, 2**16, ()))
    seqs, _ = random_sequences([11, 7, 14, 5], CONFIG["vocab_size"], torch.Generator().manual_seed(seed))
    ref_loss, ref_grads, lp_grads, same, no_entropy = loss_rank(CONFIG, None, seqs, options, seed)
    assert same and no_entropy
    if not options:  # the fused loss is the log-prob head's -sum / n (another order of the same sums)
        for name, ref in ref_grads.items():
            assert rel_err(lp_grads[name], ref, floor=1e-3) <= 1e-5, name
    for loss, grads, _, same, no_entropy in get_pool(world).run(loss_rank, CONFIG, dict(layout, dp_shard=1), seqs,
                                                                  options, seed):
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss) and same and no_entropy
        for name, ref in ref_grads.items():
            assert rel_err(grads[name], ref, floor=1e-3) <= 1e-5, name


@pytest.mark.parametrize("world, layout, options", [
    (2, dict(tp=2), {}), (2, dict(cp=2), dict(z_loss=1e-2)), (4, dict(cp=2, tp=2), dict(label_smoothing=0.1)),
], ids=["tp2", "cp2", "cp2xtp2"])
def test_model_loss_under_tp_and_cp_equals_one_device(world, layout, options):
    """The causal LM's `loss=` under TP (vocab-parallel statistics, sequence-parallel hidden states gathered), CP
    (each rank's token shard over the global count) and both = one process; `entropy=False` on each layout."""
    _check_layout(world, layout, options)
