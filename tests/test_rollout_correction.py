"""Rollout log-prob correction (`rl.rollout_correction`, verl's rollout correction): truncated per-token importance
weights (TIS) and sequence masking (MIS) against a hand computation, the mismatch metrics against an injected
mismatch, and no change at all when the engine's log-probs are the trainer's (`--rollout-logprobs noise:0`)."""

from __future__ import annotations

import math

import pytest
import torch

from dtllama.train import rl
from dtllama.train.ppo import PPO

# Two sequences of 5 and 4 tokens; the response tokens (mask 1) are the last 3 of the first, the last 2 of the second.
CU = torch.tensor([0, 5, 9])
MASK = torch.tensor([0, 0, 1, 1, 1, 0, 0, 1, 1], dtype=torch.float32)


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(9, generator=g) * 3
    rollout = old + torch.randn(9, generator=g) * 0.5
    return old, rollout


def test_tis_weights_are_the_truncated_token_ratios():
    old, rollout = batch(int(torch.randint(0, 2**16, ())))
    weights, m = rl.rollout_correction(old, rollout, MASK, CU, "tis", cap=1.5)
    for t in range(9):
        expected = min(math.exp(float(old[t] - rollout[t])), 1.5) if MASK[t] else 0.0
        assert abs(float(weights[t]) - expected) <= 1e-6 * max(expected, 1), t
    diffs = [abs(float(old[t] - rollout[t])) for t in range(9) if MASK[t]]
    assert abs(m["logprob_diff_mean"] - sum(diffs) / 5) <= 1e-6 and abs(m["logprob_diff_max"] - max(diffs)) <= 1e-6
    k3 = [math.exp(float(old[t] - rollout[t])) - 1 - float(old[t] - rollout[t]) for t in range(9) if MASK[t]]
    assert abs(m["kl_rollout_train"] - sum(k3) / 5) <= 1e-6 and m["kl_rollout_train"] >= 0


def test_mis_masks_whole_sequences_whose_ratio_leaves_the_bounds():
    old = torch.zeros(9)
    rollout = torch.zeros(9)
    rollout[2:5] = -0.4  # sequence 0: ratio exp(1.2) = 3.3 > 2: masked
    rollout[7:9] = torch.tensor([0.1, -0.2])  # sequence 1: ratio exp(0.1) = 1.1: kept
    rollout[0] = 5.0  # a prompt token's difference counts for nothing
    weights, m = rl.rollout_correction(old, rollout, MASK, CU, "mis", low=0.5, high=2.0)
    assert weights.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert m["masked_seq_frac"] == 0.5 and abs(m["weight_mean"] - 2 / 5) <= 1e-7
    weights, m = rl.rollout_correction(old, rollout, MASK, CU, "mis", low=0.5, high=4.0)
    assert weights.tolist() == MASK.tolist() and m["masked_seq_frac"] == 0.0


def test_no_mismatch_weighs_one_and_changes_no_bit_of_the_loss():
    """The engine's log-probs equal to the trainer's (`noise:0`): every weight is exactly 1 and the policy loss and
    its gradient are bitwise those without a correction."""
    old, _ = batch(int(torch.randint(0, 2**16, ())))
    g = torch.Generator().manual_seed(3)
    adv, lp = torch.randn(9, generator=g), (old + 0.1 * torch.randn(9, generator=g)).requires_grad_()
    for mode in ("tis", "mis"):
        weights, m = rl.rollout_correction(old, old.clone(), MASK, CU, mode)
        assert torch.equal(weights, MASK) and m["logprob_diff_max"] == 0.0 and m["kl_rollout_train"] == 0.0
        a, _ = rl.policy_loss(lp, old, adv, MASK, cu_seqlens=CU, weights=weights)
        (ga,) = torch.autograd.grad(a, lp)
        b, _ = rl.policy_loss(lp, old, adv, MASK, cu_seqlens=CU)
        (gb,) = torch.autograd.grad(b, lp)
        assert torch.equal(a, b) and torch.equal(ga, gb)


def test_weights_scale_each_tokens_term():
    old, rollout = batch(7)
    g = torch.Generator().manual_seed(8)
    adv, lp = torch.randn(9, generator=g), old + 0.1 * torch.randn(9, generator=g)
    weights, _ = rl.rollout_correction(old, rollout, MASK, CU, "tis", cap=2.0)
    loss, _ = rl.policy_loss(lp, old, adv, MASK, 0.2, 0.2, weights=weights)
    r = torch.exp(lp - old)
    per_token = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2)) * weights * MASK
    assert abs(float(loss) - float(per_token.sum() / MASK.sum())) <= 1e-6


def test_injected_noise_is_the_reported_mismatch():
    """`--rollout-logprobs noise:SIGMA` adds SIGMA * N(0, 1) to the response tokens' log-probs: the reported mean
    |difference| is the mean |noise| drawn."""
    sigma = 0.05
    old = -torch.rand(9)
    noise = sigma * torch.randn(9, generator=torch.Generator().manual_seed(11)) * MASK
    _, m = rl.rollout_correction(old, old + noise, MASK, CU, "none")
    assert abs(m["logprob_diff_mean"] - float(noise.abs().sum() / MASK.sum())) <= 1e-7
    assert abs(m["logprob_diff_max"] - float(noise.abs().max())) <= 1e-7
    assert PPO(rollout_logprobs=f"noise:{sigma}").rollout_noise() == sigma and PPO().rollout_noise() == 0.0


def test_bad_options_name_the_fix():
    old, rollout = batch(1)
    with pytest.raises(ValueError, match="mode='is' is not one of"):
        rl.rollout_correction(old, rollout, MASK, CU, "is")
    with pytest.raises(ValueError, match="low=1.5, high=2.0 must bracket 1"):
        rl.rollout_correction(old, rollout, MASK, CU, "mis", low=1.5)
    with pytest.raises(ValueError, match="rollout_logprobs has shape"):
        rl.rollout_correction(old, rollout[:5], MASK, CU, "tis")
    with pytest.raises(ValueError, match="--rollout-logprobs 'noise:-1': expected 'trainer' or 'noise:SIGMA'"):
        PPO(rollout_logprobs="noise:-1")
    with pytest.raises(ValueError, match="--rollout-logprobs 'vllm'"):
        PPO(rollout_logprobs="vllm")
