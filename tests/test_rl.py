"""PPO / GRPO losses (dtllama.train.rl) against hand-computed values and slow references, and recipes/ppo.py under
torchrun at world 1, 2 (tp=2) and 4 (dp_shard=2 x tp=2)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import ROOT, torchrun

from dtllama.train import rl
from dtllama.ops import cu_seqlens_from_lengths

# Hand-computed values below are exact decimals or closed forms evaluated in fp32: 1e-6 covers fp32 rounding
# of a few operations on numbers of magnitude ~1.
TOL = 1e-6


def _pg_case():
    """Five tokens: clipped high (A>0, r=1.5), clipped low (A<0, r=0.5), inside (A>0, r=0.9), pessimistic
    unclipped (A<0, r=1.5), and a masked token with garbage that must not count."""
    old = torch.randn(5)
    ratio = torch.tensor([1.5, 0.5, 0.9, 1.5, 7.0])
    lp = (old + ratio.log()).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 2.0, -1.0, 5.0])
    mask = torch.tensor([1, 1, 1, 1, 0])
    return lp, old, adv, mask


def test_policy_loss_clips_both_sides_and_ignores_masked_tokens():
    lp, old, adv, mask = _pg_case()
    loss, m = rl.policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert abs(loss.item() - (-1.2 + 0.8 - 1.8 + 1.5) / 4) <= TOL
    # per token max(-A r, -A clip(r, .8, 1.2)): -1.2, 0.8, -1.8, 1.5 (token 4 masked)
    assert m["clip_frac_high"] == 0.25 and m["clip_frac_low"] == 0.25 and m["clip_frac"] == 0.5
    # approx-KL is k3 of (old - new) = 1/r + ln r - 1 over the 4 response tokens; |r - 1| peaks at 0.5.
    want_kl = sum(1 / r + math.log(r) - 1 for r in (1.5, 0.5, 0.9, 1.5)) / 4
    assert abs(m["approx_kl"] - want_kl) <= TOL and abs(m["ratio_max_dev"] - 0.5) <= TOL
    loss.backward()
    # Clipped tokens get no gradient; d(-A r)/d lp = -A r for the others, over 4 tokens; the masked one none.
    want = torch.tensor([0.0, 0.0, -2.0 * 0.9 / 4, 1.5 / 4, 0.0])
    assert float((lp.grad - want).abs().max()) <= TOL, lp.grad
    # Asymmetric bounds: clip_high=0.6 lets token 0 (r=1.5) through unclipped: -1.5 instead of -1.2.
    loss_hi, m_hi = rl.policy_loss(lp.detach(), old, adv, mask, clip_low=0.2, clip_high=0.6)
    assert abs(float(loss_hi) - (-1.5 + 0.8 - 1.8 + 1.5) / 4) <= TOL
    assert m_hi["clip_frac_high"] == 0.0 and m_hi["clip_frac_low"] == 0.25


def test_aggregation_modes_and_explicit_normalizer():
    lp, old, adv, mask = _pg_case()
    lp = lp.detach()
    cu = cu_seqlens_from_lengths([1, 4])  # seq 0: token 0; seq 1: tokens 1-3 (+ masked token 4)
    seq, _ = rl.policy_loss(lp, old, adv, mask, 0.2, 0.2, agg="seq-mean-token-mean", cu_seqlens=cu)
    assert abs(float(seq) - (-1.2 + (0.8 - 1.8 + 1.5) / 3) / 2) <= TOL
    # A normalizer spanning ranks: the global count (8 tokens, 5 sequences), not this tensor's.
    tok8, _ = rl.policy_loss(lp, old, adv, mask, 0.2, 0.2, normalizer=8)
    assert abs(float(tok8) - (-0.7 / 8)) <= TOL
    seq5, _ = rl.policy_loss(lp, old, adv, mask, 0.2, 0.2, agg="seq-mean-token-mean", cu_seqlens=cu, normalizer=5)
    assert abs(float(seq5) - (-1.2 + 0.5 / 3) / 5) <= TOL
    # A sequence with no response token counts in neither sum nor default normalizer.
    x, m = torch.randn(6), torch.tensor([0, 0, 1, 1, 1, 0])
    got = rl.aggregate(x, m, "seq-mean-token-mean", cu_seqlens_from_lengths([2, 4]))
    assert abs(float(got) - float(x[2:5].mean())) <= TOL
    with pytest.raises(ValueError, match="agg='sum' is not one of"):
        rl.aggregate(x, m, "sum")
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        rl.aggregate(x, m, "seq-mean-token-mean")


def test_value_loss_clipped():
    v = torch.tensor([1.0, 0.0, 2.0])
    old = torch.tensor([0.5, 0.1, 2.0])
    ret = torch.tensor([1.0, 1.0, -50.0])
    loss, m = rl.value_loss(v, old, ret, torch.tensor([1, 1, 0]), clip=0.2)
    # t0: max(0, (0.7-1)^2) = 0.09 (clip wins); t1: max(1, (0.0-1)^2) = 1; t2 masked
    assert abs(float(loss) - 0.5 * (0.09 + 1.0) / 2) <= TOL
    assert m["vf_clip_frac"] == 0.5 and abs(m["value_error"] - 0.5) <= TOL


def test_kl_estimators_and_entropy_bonus():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(rl.kl_penalty(lp, ref, "k1"), torch.tensor([0.5, -1.0]), atol=TOL, rtol=0)
    want = torch.tensor([math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 2])
    assert torch.allclose(rl.kl_penalty(lp, ref, "k3"), want, atol=TOL, rtol=0)
    assert float(rl.kl_penalty(lp, lp, "k3").abs().max()) == 0.0  # exactly 0 at equal log-probs
    with pytest.raises(ValueError, match="kind='k2' is not one of"):
        rl.kl_penalty(lp, ref, "k2")
    ent = torch.rand(4) * 3
    assert abs(float(rl.entropy_bonus(ent, torch.tensor([1, 0, 1, 1]))) - float(ent[[0, 2, 3]].mean())) <= TOL


def _gae_reference(rewards, values, mask, cu, gamma, lam):
    """verl's loop: per sequence, over its response tokens right to left, next value 0 after the last."""
    adv = torch.zeros(len(rewards), dtype=torch.float64)
    for s in range(len(cu) - 1):
        idx = [t for t in range(int(cu[s]), int(cu[s + 1])) if mask[t]]
        last = 0.0
        for j in reversed(range(len(idx))):
            nv = float(values[idx[j + 1]]) if j + 1 < len(idx) else 0.0
            delta = float(rewards[idx[j]]) + gamma * nv - float(values[idx[j]])
            last = delta + gamma * lam * last
            adv[idx[j]] = last
    return adv


def test_gae_matches_slow_reference_loop():
    torch.manual_seed(0)
    lengths = [7, 3, 9, 5]
    cu = cu_seqlens_from_lengths(lengths)
    prompt = [3, 1, 4, 2]
    mask = torch.zeros(sum(lengths), dtype=torch.int64)
    for s, p in enumerate(prompt):
        mask[int(cu[s]) + p - 1: int(cu[s + 1]) - 1] = 1  # label positions of the response tokens
    rewards, values = torch.randn(sum(lengths)) * mask, torch.randn(sum(lengths))
    for gamma, lam in [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)]:
        adv, ret = rl.gae_advantages(rewards, values, mask, cu, gamma, lam)
        ref = _gae_reference(rewards, values, mask, cu, gamma, lam)
        # float64 recursion in both, the result rounded once to fp32: one fp32 ulp of values ~1-10.
        assert float((adv.double() - ref).abs().max()) <= 1e-5, (gamma, lam)
        assert float((ret - (adv + values) * mask).abs().max()) <= 1e-6
        assert float(adv[mask == 0].abs().max()) == 0.0
    # gamma = lam = 1 telescopes: the first response token's advantage is the sum of rewards minus its value.
    adv, _ = rl.gae_advantages(rewards, values, mask, cu, 1.0, 1.0)
    first = int(cu[0]) + prompt[0] - 1
    assert abs(float(adv[first]) - float(rewards[: int(cu[1])].sum() - values[first])) <= 1e-5


def test_grpo_normalizes_within_groups():
    scores = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.5, 2.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 7])
    adv = rl.grpo_advantages(scores, groups, eps=0.0 + 1e-6)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 1)
    want = torch.tensor([(1 / 3) / std, (-2 / 3) / std, (1 / 3) / std, 0.0, 0.0, 0.0])
    assert torch.allclose(adv, want, atol=1e-5, rtol=0), adv  # eps=1e-6 in the denominator: ~2e-6 relative
    cu = cu_seqlens_from_lengths([3, 2])
    tok = rl.broadcast_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([0, 1, 1, 1, 0]), cu)
    assert tok.tolist() == [0.0, 2.0, 2.0, -1.0, 0.0]


def test_explained_variance():
    ret, mask = torch.randn(10), torch.ones(10)
    assert abs(rl.explained_variance(ret, ret, mask) - 1.0) <= TOL
    assert abs(rl.explained_variance(torch.full((10,), float(ret.mean())), ret, mask)) <= 1e-5  # mean: EV 0
    v = ret + torch.randn(10)
    d, r = (ret - v).double(), ret.double()
    want = 1 - d.var(unbiased=False) / r.var(unbiased=False)
    assert abs(rl.explained_variance(v, ret, mask) - float(want)) <= 1e-6


def test_bad_inputs_raise_clear_errors():
    lp, old, adv, mask = _pg_case()
    with pytest.raises(ValueError, match="response_mask is all zero"):
        rl.policy_loss(lp, old, adv, torch.zeros(5))
    with pytest.raises(ValueError, match=r"advantages has a non-finite value \(nan\) at response token 2"):
        rl.policy_loss(lp, old, torch.tensor([1.0, 1.0, float("nan"), 1.0, 1.0]), mask)
    with pytest.raises(ValueError, match=r"old_logprobs has shape \(4,\) but logprobs has \(5,\)"):
        rl.policy_loss(lp, old[:4], adv, mask)
    with pytest.raises(ValueError, match=r"response_mask has shape \(6,\) but logprobs"):
        rl.policy_loss(lp, old, adv, torch.ones(6))
    cu = cu_seqlens_from_lengths([5])
    with pytest.raises(ValueError, match="rewards has a non-finite value"):
        rl.gae_advantages(torch.tensor([0, 0, 0, float("nan"), 0]), torch.randn(5), mask, cu)
    with pytest.raises(ValueError, match="response_mask is all zero"):
        rl.gae_advantages(torch.zeros(5), torch.randn(5), torch.zeros(5), cu)
    with pytest.raises(ValueError, match="cu_seqlens ends at 4"):
        rl.gae_advantages(torch.zeros(5), torch.randn(5), mask, cu_seqlens_from_lengths([4]))
    with pytest.raises(ValueError, match="scores hold a non-finite"):
        rl.grpo_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    # A NaN on a masked (prompt) token is not an error: it never enters the loss.
    nan_prompt = adv.clone()
    nan_prompt[4] = float("nan")
    lp.grad = None
    loss, _ = rl.policy_loss(lp, old, nan_prompt, mask)
    loss.backward()
    assert math.isfinite(loss.detach().item()) and bool(torch.isfinite(lp.grad).all()), lp.grad


# ------------------------------------------------------------------------------------------ the recipe


def _env() -> dict:
    """This checkout's dtllama first: an editable install elsewhere must not shadow the code under test."""
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def ppo(tmp_path, nproc: int, *args: str) -> list[dict]:
    """Run recipes/ppo.py under torchrun (this checkout first on the path); its per-iteration metrics."""
    metrics = tmp_path / f"ppo-{len(list(tmp_path.glob('ppo-*')))}.jsonl"
    proc = torchrun(nproc, os.path.join(ROOT, "recipes", "ppo.py"), "--metrics", str(metrics), "--prompts", "2",
                    "--group-size", "2", "--max-new-tokens", "3", "--ppo-epochs", "4", "--lr", "1e-3", *args,
                    cwd=tmp_path, env=_env())
    print(proc.stdout[-2000:])
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def _check_rows(rows, iterations):
    assert len(rows) == iterations
    for r in rows:
        # The first epoch's forward is the rollout's forward on the same weights and batch: bitwise equal.
        assert r["first_exact"] is True and r["first_ratio_max_dev"] == 0.0 and r["first_approx_kl"] == 0.0, r
        assert all(math.isfinite(x) for x in r["pg_loss"] + r["vf_loss"] + r["kl"])
        assert 0.0 <= r["reward_mean"] <= 1.0 and 0.0 <= r["clip_frac"] <= 1.0
        assert r["approx_kl"] > 0.0  # the epochs moved the actor away from the rollout policy
    pg = rows[0]["pg_loss"]
    # Four epochs on one fixed batch: the clipped surrogate is what the actor descends, so it falls each epoch.
    assert all(b < a for a, b in zip(pg, pg[1:])), pg


def test_ppo_recipe_world1_tp2_cp2_exact_first_minibatch_same_losses(tmp_path):
    """The acceptance runs at world 1 and tp=2, Ulysses cp=2 and pipeline pp=2: all sample the same responses
    (batch rank 0, same seed; TP ranks share full-vocab logits, CP ranks gather all tokens', pipeline ranks get
    the last stage's), so their per-epoch losses agree too (under CP every rank computes the losses over the
    gathered whole sequences; under PP the last stage, per microbatch)."""
    one = ppo(tmp_path, 1, "--iterations", "1")
    for layout in (("--tp", "2"), ("--cp", "2"), ("--pp", "2")):
        other = ppo(tmp_path, 2, "--iterations", "1", *layout)
        _check_rows(one, 1)
        _check_rows(other, 1)
        assert one[0]["samples"] == other[0]["samples"]
        for key in ("pg_loss", "vf_loss", "kl"):
            for a, b in zip(one[0][key], other[0][key]):
                # fp32 sums in another order (sharded matmuls, all-reduces), grown over <= 3 AdamW steps.
                assert abs(a - b) <= 1e-5 * max(abs(a), 1e-3), (layout, key, one[0][key], other[0][key])


def test_ppo_recipe_dp2_tp2_exact_first_minibatch(tmp_path):
    """World 4 (dp_shard=2 x tp=2, FSDP + TP), with the other options: sequence-mean aggregation, k1 KL."""
    _check_rows(ppo(tmp_path, 4, "--iterations", "1", "--dp-shard", "2", "--tp", "2",
                    "--agg", "seq-mean-token-mean", "--kl-kind", "k1"), 1)


def test_ppo_recipe_grpo_option(tmp_path):
    rows = ppo(tmp_path, 1, "--iterations", "2", "--advantage", "grpo", "--group-size", "3")
    assert len(rows) == 2
    assert all(r["first_exact"] and r["first_ratio_max_dev"] == 0.0 for r in rows)
    for r in rows:
        if r["reward_mean"] == 0.0:  # the random model rarely writes a digit: equal scores, zero advantages,
            assert r["pg_loss"] == [0.0] * 4 and r["kl"] == [0.0] * 4 and r["approx_kl"] == 0.0, r  # so the
            # actor never moves: zero advantages and a k3 KL whose gradient is 0 at the reference


def test_ppo_recipe_dp2_cp2_seq_mean_exact_first_minibatch(tmp_path):
    """World 4 (dp_shard=2 x cp=2) against world 2 (dp_shard=2): sequence-mean aggregation over sequences whose
    tokens two CP ranks hold gives the same losses."""
    args = ("--iterations", "1", "--dp-shard", "2", "--agg", "seq-mean-token-mean")
    dp2, cp2 = ppo(tmp_path, 2, *args), ppo(tmp_path, 4, *args, "--cp", "2")
    _check_rows(cp2, 1)
    assert dp2[0]["samples"] == cp2[0]["samples"]
    for key in ("pg_loss", "vf_loss", "kl"):
        for a, b in zip(dp2[0][key], cp2[0][key]):
            assert abs(a - b) <= 1e-5 * max(abs(a), 1e-3), (key, dp2[0][key], cp2[0][key])


def test_ppo_recipe_pp2_tp2_exact_first_minibatch_seq_mean(tmp_path):
    """World 4 (pp=2 x tp=2, Interleaved1F1B over 4 layers): per-microbatch sequence-mean losses on the last
    stage add up to the batch's, so the losses equal world 1's."""
    args = ("--iterations", "1", "--agg", "seq-mean-token-mean", "--kl-kind", "k1")
    one = ppo(tmp_path, 1, *args, "--set", "num_hidden_layers=4")
    pp = ppo(tmp_path, 4, *args, "--set", "num_hidden_layers=4", "--pp", "2", "--tp", "2",
             "--pp-schedule", "Interleaved1F1B")
    _check_rows(pp, 1)
    assert one[0]["samples"] == pp[0]["samples"]
    for key in ("pg_loss", "vf_loss", "kl"):
        for a, b in zip(one[0][key], pp[0][key]):
            assert abs(a - b) <= 1e-5 * max(abs(a), 1e-3), (key, one[0][key], pp[0][key])
