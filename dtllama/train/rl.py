"""PPO / GRPO building blocks on packed `[T]` token layouts (plain tensors, no collectives).

Every per-token tensor lies on the packed layout the model returns: position `t` holds the log-prob,
entropy or value read at `t` for the token `labels[t]`. `response_mask[t]` is 1 where `labels[t]` is a
response (generated) token, 0 for prompt tokens, sequence ends and padding; only those tokens carry a loss.

Aggregation (`agg`):

- `token-mean`: sum of the masked per-token losses / `normalizer` (default: this tensor's response-token
  count). Every response token weighs the same.
- `seq-mean-token-mean`: each sequence's mean over its response tokens, summed / `normalizer` (default:
  the number of sequences here with at least one response token). Every sequence weighs the same.

The normalizer is an argument so that a loss can span ranks: pass the *global* count (all-reduced over
the data-parallel mesh before the step) and every token (or sequence) weighs the same whichever rank
holds it; then multiply by the dp size if the gradient is averaged over dp ranks (as FSDP does).
Inputs are validated here, on each rank, so that a bad batch raises before the caller's first collective.
"""

from __future__ import annotations

import math

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean")
KL_KINDS = ("k1", "k3")


def _check_mask(response_mask: torch.Tensor, name: str = "response_mask", allow_empty: bool = False) -> torch.Tensor:
    """The mask as float. All zero is an error (every mean would be 0/0) unless `allow_empty`: a loss over a
    global `normalizer`, where a micro-batch of prompts alone contributes 0 to the step (and nothing else)."""
    if response_mask.dim() != 1:
        raise ValueError(f"{name} must be packed [T], got shape {tuple(response_mask.shape)}")
    if not allow_empty and not bool(response_mask.any()):
        raise ValueError(f"{name} is all zero ({response_mask.numel()} tokens): there is no response token to "
                         "train on; mark the generated tokens' label positions with 1 (a rank must hold at "
                         "least one response), or pass the step's global normalizer (a micro-batch without a "
                         "response then adds 0)")
    return response_mask.to(torch.float32)


def _check_same_shape(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """Per-token tensors must share the packed length: a shorter one means a different batch or layout."""
    for name, x in others.items():
        if x.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has {tuple(ref.shape)}; they must "
                             "come from the same packed batch (same sequences, same padding to the token multiple)")


def _check_finite(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    """NaN/inf on a response token would silently poison the whole update."""
    for name, x in tensors.items():
        bad = ~torch.isfinite(x) & (mask > 0)
        if bool(bad.any()):
            t = int(bad.nonzero()[0])
            raise ValueError(f"{name} has a non-finite value ({float(x[t])}) at response token {t} "
                             f"({int(bad.sum())} in all); fix the reward function or the step that produced it")


def aggregate(loss: torch.Tensor, response_mask: torch.Tensor, agg: str = "token-mean",
              cu_seqlens: torch.Tensor | None = None, normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce per-token `loss [T]` over the response tokens (see the module docstring for the modes)."""
    mask = _check_mask(response_mask, allow_empty=normalizer is not None)
    _check_same_shape("response_mask", response_mask, loss=loss)
    if agg == "token-mean":
        total = torch.where(mask > 0, loss, 0.0).sum()  # where, not *: a NaN off the response stays out
        # An all-masked micro-batch sums to 0 and stays 0 (not 0 / 0): it contributes nothing, breaks nothing.
        return total / (mask.sum().clamp_min(1) if normalizer is None else normalizer)
    if agg == "seq-mean-token-mean":
        if cu_seqlens is None:
            raise ValueError("agg='seq-mean-token-mean' needs cu_seqlens to find each sequence's tokens")
        seq = _seq_index(cu_seqlens, loss.shape[0])
        n = loss.new_zeros(cu_seqlens.numel() - 1).index_add_(0, seq, mask)
        s = loss.new_zeros(cu_seqlens.numel() - 1).index_add_(0, seq, torch.where(mask > 0, loss, 0.0))
        per_seq = torch.where(n > 0, s / n.clamp_min(1), 0.0)
        return per_seq.sum() / ((n > 0).sum().clamp_min(1) if normalizer is None else normalizer)
    raise ValueError(f"agg={agg!r} is not one of {AGG_MODES}")


def _seq_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Sequence number of every packed token."""
    cu = cu_seqlens.long()
    if int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but the per-token tensors have T={total}; "
                         "pass the cu_seqlens of the same packed batch")
    return torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1])


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
                   cu_seqlens: torch.Tensor, gamma: float = 1.0, lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation per sequence on packed tokens: `(advantages, returns)`, both `[T]`,
    0 off the response.

    `rewards [T]` holds each token's reward (the sequence score at its last response token, as verl
    puts it, plus any per-token KL penalty). Within a sequence the response tokens are taken in order
    (prompt tokens skipped); after the last one the next value is 0 (the episode ends), so no value
    leaks across packed sequence boundaries. Returns are `advantages + values` (the critic's target).
    The backward recursion runs in float64 on the host: it is sequential, short, and a sum of many
    discounted terms.
    """
    mask = _check_mask(response_mask)
    _check_same_shape("response_mask", response_mask, rewards=rewards, values=values)
    _check_finite(mask, rewards=rewards, values=values)
    idx = mask.nonzero().squeeze(-1)
    seq = _seq_index(cu_seqlens, mask.shape[0])[idx].tolist()
    r, v = rewards[idx].double().tolist(), values[idx].detach().double().tolist()
    adv = [0.0] * len(idx)
    last, next_v = 0.0, 0.0
    for i in range(len(idx) - 1, -1, -1):
        if i == len(idx) - 1 or seq[i + 1] != seq[i]:  # the sequence's last response token
            last, next_v = 0.0, 0.0
        delta = r[i] + gamma * next_v - v[i]
        last = delta + gamma * lam * last
        adv[i], next_v = last, v[i]
    advantages = torch.zeros_like(values, dtype=torch.float32)
    advantages[idx] = torch.tensor(adv, dtype=torch.float64).to(advantages)
    returns = torch.where(mask > 0, advantages + values.detach().float(), 0.0)
    return advantages, returns


def grpo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalized sequence advantages `(score - group mean) / (group std + eps)` (GRPO), `[B]`.

    `group_ids [B]` names the prompt each sequence answers; the std is the unbiased one (as verl and
    the GRPO paper's code use) and a group of one gets advantage 0 (it has no baseline but itself).
    Broadcast to the response tokens with `broadcast_to_tokens`.
    """
    if scores.shape != group_ids.shape or scores.dim() != 1:
        raise ValueError(f"scores {tuple(scores.shape)} and group_ids {tuple(group_ids.shape)} must both be [B]")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"scores hold a non-finite value ({scores.tolist()}); fix the reward function")
    _, inv = torch.unique(group_ids, return_inverse=True)
    g = int(inv.max()) + 1
    s = scores.double()
    n = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, torch.ones_like(s))
    mean = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, s) / n
    sq = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, (s - mean[inv]) ** 2)
    std = torch.where(n > 1, (sq / (n - 1).clamp_min(1)).sqrt(), 0.0)
    adv = torch.where(n[inv] > 1, (s - mean[inv]) / (std[inv] + eps), 0.0)
    return adv.to(scores.dtype if scores.is_floating_point() else torch.float32)


def broadcast_to_tokens(per_seq: torch.Tensor, response_mask: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """A per-sequence value `[B]` copied to each sequence's response tokens `[T]` (0 elsewhere)."""
    mask = _check_mask(response_mask)
    seq = _seq_index(cu_seqlens, mask.shape[0])
    if per_seq.shape != (cu_seqlens.numel() - 1,):
        raise ValueError(f"per-sequence tensor has shape {tuple(per_seq.shape)}, expected "
                         f"[{cu_seqlens.numel() - 1}] (one per sequence of cu_seqlens)")
    return per_seq.float()[seq] * mask


def policy_loss(logprobs, old_logprobs, advantages, response_mask, clip_low: float = 0.2, clip_high: float = 0.2,
                agg: str = "token-mean", cu_seqlens=None, normalizer=None, weights=None) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate `max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))`, `r = exp(lp - old_lp)`.

    `weights` (per token, no gradient): each token's term times it before aggregation: the rollout correction's
    importance weights (`rollout_correction`); None is a weight of 1.

    The two bounds are separate (decoupled clip, as DAPO's clip-higher): a positive advantage stops
    pulling once `r > 1 + clip_high`, a negative one once `r < 1 - clip_low`. Metrics (detached floats of
    this rank's tokens): `clip_frac_high`, `clip_frac_low` (tokens whose gradient the clip cut, each side),
    `clip_frac` (their sum), `approx_kl` (k3 of old vs new, >= 0) and `ratio_max_dev` (max |r - 1|,
    exactly 0 when recomputed on the rollout weights).
    """
    mask = _check_mask(response_mask, allow_empty=normalizer is not None)
    _check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, advantages=advantages,
                      response_mask=response_mask)
    _check_finite(mask, advantages=advantages, old_logprobs=old_logprobs)
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low={clip_low}, clip_high={clip_high} must be >= 0 (e.g. 0.2 and 0.2, or 0.28 high)")
    # Off the response everything is zeroed first, so garbage there reaches neither the loss nor its gradient.
    log_ratio = torch.where(mask > 0, logprobs - old_logprobs, 0.0)
    advantages = torch.where(mask > 0, advantages, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        _check_same_shape("logprobs", logprobs, weights=weights)
        per_token = per_token * weights.detach()
    loss = aggregate(per_token, response_mask, agg, cu_seqlens, normalizer)
    with torch.no_grad():
        cut = (clipped > unclipped) & (mask > 0)
        n = mask.sum().clamp_min(1)
        high = float((cut & (advantages > 0)).sum() / n)
        low = float((cut & (advantages < 0)).sum() / n)
        metrics = dict(clip_frac_high=high, clip_frac_low=low, clip_frac=high + low,
                       approx_kl=float(masked_mean(kl_penalty(logprobs, old_logprobs, "k3"), mask)),
                       ratio_max_dev=float(((ratio - 1).abs() * mask).max()))
    return loss, metrics


CORRECTIONS = ("none", "tis", "mis")


def rollout_correction(old_logprobs, rollout_logprobs, response_mask, cu_seqlens, mode: str = "tis",
                       cap: float = 2.0, low: float = 0.5, high: float = 2.0) -> tuple[torch.Tensor, dict]:
    """Importance weights `[T]` for the policy loss when the rollout engine's log-probs differ from the trainer's
    (other kernels, bf16): the tokens were sampled from the engine's distribution, the loss assumes the trainer's.
    verl's rollout correction (its `docs/algo/rollout_corr.md`), with `r_t = exp(old_lp_t - rollout_lp_t)`:

    - "tis" (truncated importance sampling, per token): `min(r_t, cap)`;
    - "mis" (masked importance sampling, per sequence): 1 where the sequence's ratio `prod_t r_t` (over its
      response tokens) lies in `[low, high]`, 0 for the whole sequence otherwise;
    - "none": 1.
    Weights are 0 off the response. Metrics (this rank's response tokens): the mismatch `logprob_diff_mean` /
    `logprob_diff_max` (|old - rollout|), `kl_rollout_train` (KL(rollout || train), Schulman's k3 on the
    rollout's samples: `r - 1 - log r`), the weights' mean and, for "mis", the share of sequences masked."""
    mask = _check_mask(response_mask)
    _check_same_shape("old_logprobs", old_logprobs, rollout_logprobs=rollout_logprobs, response_mask=response_mask)
    _check_finite(mask, old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs)
    if mode not in CORRECTIONS:
        raise ValueError(f"rollout correction mode={mode!r} is not one of {CORRECTIONS}")
    if not (cap > 0 and 0 <= low <= 1 <= high):
        raise ValueError(f"cap={cap} must be > 0 and low={low}, high={high} must bracket 1 (e.g. 2.0, 0.5, 2.0)")
    with torch.no_grad():
        log_r = torch.where(mask > 0, old_logprobs.float() - rollout_logprobs.float(), 0.0)
        metrics = dict(logprob_diff_mean=float(masked_mean(log_r.abs(), mask)),
                       logprob_diff_max=float(log_r.abs().max()),
                       kl_rollout_train=float(masked_mean(torch.exp(log_r) - 1 - log_r, mask)))
        if mode == "none":
            weights = mask.float()
        elif mode == "tis":
            weights = torch.clamp(torch.exp(log_r), max=cap) * mask
        else:
            seq = _seq_index(cu_seqlens, mask.shape[0])
            n_seqs = cu_seqlens.numel() - 1
            seq_log_r = torch.zeros(n_seqs, dtype=log_r.dtype, device=log_r.device).index_add_(0, seq, log_r)
            keep = (seq_log_r >= math.log(low) if low > 0 else torch.ones_like(seq_log_r, dtype=torch.bool))
            keep &= seq_log_r <= math.log(high)
            has_response = torch.zeros(n_seqs, device=mask.device).index_add_(0, seq, mask.float()) > 0
            metrics["masked_seq_frac"] = float((~keep & has_response).sum() / has_response.sum().clamp_min(1))
            weights = keep.float()[seq] * mask
        metrics["weight_mean"] = float(masked_mean(weights, mask))
    return weights, metrics


def value_loss(values, old_values, returns, response_mask, clip: float = 0.2, agg: str = "token-mean",
               cu_seqlens=None, normalizer=None) -> tuple[torch.Tensor, dict]:
    """Clipped value loss `0.5 max((v - R)^2, (old_v + clip(v - old_v, -clip, clip) - R)^2)`.

    The clip keeps the critic near the values the advantages were computed with (PPO2's value clip).
    Metrics: `vf_clip_frac` (tokens where the clipped term won) and `value_error` (mean |v - R|).
    """
    mask = _check_mask(response_mask, allow_empty=normalizer is not None)
    _check_same_shape("values", values, old_values=old_values, returns=returns, response_mask=response_mask)
    _check_finite(mask, returns=returns, old_values=old_values)
    old_values, returns = torch.where(mask > 0, old_values, 0.0), torch.where(mask > 0, returns, 0.0)
    values = torch.where(mask > 0, values, 0.0)
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    a, b = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * aggregate(torch.maximum(a, b), response_mask, agg, cu_seqlens, normalizer)
    with torch.no_grad():
        metrics = dict(vf_clip_frac=float(masked_mean((b > a).float(), mask)),
                       value_error=float(masked_mean((values - returns).abs(), mask)))
    return loss, metrics


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled token's log-probs (Schulman's estimators).

    `k1 = lp - ref_lp`: unbiased, can be negative. `k3 = exp(ref_lp - lp) - (ref_lp - lp) - 1`: unbiased,
    never negative, lower variance; the usual choice for a KL loss.
    """
    _check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs)
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k3":
        d = ref_logprobs - logprobs
        return torch.exp(d) - d - 1
    raise ValueError(f"kind={kind!r} is not one of {KL_KINDS}")


def entropy_bonus(entropy: torch.Tensor, response_mask: torch.Tensor, agg: str = "token-mean",
                  cu_seqlens=None, normalizer=None) -> torch.Tensor:
    """Mean policy entropy over the response tokens; subtract `coef *` it from the loss to keep exploring."""
    return aggregate(entropy, response_mask, agg, cu_seqlens, normalizer)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1 (this rank's tokens only); 0 where there are none."""
    return torch.where(mask > 0, x, 0.0).sum() / (mask > 0).sum().clamp_min(1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor) -> float:
    """`1 - Var(R - V) / Var(R)` over the response tokens: 1 = the critic predicts the returns, 0 = no better
    than their mean, < 0 = worse. NaN when the returns do not vary."""
    mask = _check_mask(response_mask)
    r, d = returns.double(), (returns - values).double()
    var = lambda x: masked_mean((x - masked_mean(x, mask.double())) ** 2, mask.double())  # noqa: E731
    vr = var(r)
    return float(1 - var(d) / vr) if float(vr) > 0 else float("nan")


__all__ = ["AGG_MODES", "CORRECTIONS", "KL_KINDS", "aggregate", "broadcast_to_tokens", "entropy_bonus", "explained_variance",
           "gae_advantages", "grpo_advantages", "kl_penalty", "masked_mean", "policy_loss", "rollout_correction", "value_loss"]
