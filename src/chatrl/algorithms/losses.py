"""Training losses as pure functions: PPO actor/critic, entropy, reward model and token log-probs.

Shapes: B = batch, T = sequence length, R = response length, V = vocabulary. mask [B, R]: 1 = the token
counts, 0 = padding / after EOS / a token the environment wrote. Per-token losses are reduced by `aggregate`
(default "token_mean": over the counted tokens of the whole batch). Inputs at masked positions are zeroed
before use, so they change neither the loss nor its gradient. Each `(loss, stats)` function returns stats as
a dict of DETACHED 0-d tensors (call `.item()` when logging; tensors can be averaged / all-reduced first).

  aggregate     token_mean:              sum_{i,t} l_it m_it / sum_{i,t} m_it         (DAPO; the default)
                seq_mean_token_mean:     mean_i [ sum_t l_it m_it / sum_t m_it ]      (original GRPO)
                seq_mean_token_sum_norm: sum_{i,t} l_it m_it / (B * L_max)            (Dr. GRPO: L_max constant)
  policy_loss   L = agg_t max(-A_t r_t, -A_t clip(r_t, 1-e_low, 1+e_high)),  r_t = exp(logp_t - old_logp_t)
                (e_high > e_low is DAPO's clip-higher); GSPO (Zheng et al. 2025, level="sequence"):
                r_t = exp(mean_t' (logp_t' - old_logp_t')) for every token of the row (one ratio per sequence);
                each token's term times a detached weight w_t when given (truncated IS: `correction`)
  value_loss    L = 0.5 * agg_t max((v_t - R_t)^2, (clip(v_t, old_t - e, old_t + e) - R_t)^2)
  entropy       H_t = logsumexp(z_t) - sum_v softmax(z_t)_v z_tv
  pairwise      L = mean_i -log sigmoid(r_c,i - r_r,i - m_i) + c * mean_i (r_c,i + r_r,i)^2
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from chatrl.algorithms.masked import masked_mean, masked_sum, zero_masked

Stats = dict[str, torch.Tensor]


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean", *, max_len: int | None = None,
              denom: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, R] over mask [B, R] to a 0-d loss (formulas: module docstring).

    max_len: Dr. GRPO's constant L_max (default: R). denom: divide by this instead of the local count of the mode's
    units (`aggregation_units`: counted tokens, rows with a counted token, or rows), so that the micro-batches of
    one optimizer step (and ranks) give exactly the mean of the whole mini-batch: pass (the mini-batch's units over
    all ranks) / (micro-batches per step * ranks), since DeepSpeed averages micro-batch losses and ranks'
    gradients. Rows without a counted token count in no mean."""
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of: {', '.join(LOSS_AGGREGATIONS)}")
    if denom is None:
        denom = aggregation_units(mask, mode).clamp(min=1)
    if mode == "token_mean":
        return masked_sum(per_token, mask) / denom
    if mode == "seq_mean_token_mean":
        return masked_mean(per_token, mask, dim=-1).sum() / denom
    return masked_sum(per_token, mask) / (denom * (max_len or per_token.shape[1]))


def aggregation_units(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """What `aggregate(mode)` divides by, counted in mask [B, R] (0-d fp32): the counted tokens (token_mean), the
    rows with a counted token (seq_mean_token_mean), all rows (seq_mean_token_sum_norm, times L_max)."""
    counted = mask.bool()
    if mode == "token_mean":
        return counted.sum().float()
    if mode == "seq_mean_token_mean":
        return counted.any(dim=-1).sum().float()
    if mode == "seq_mean_token_sum_norm":
        return torch.tensor(float(mask.shape[0]), device=mask.device)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of: {', '.join(LOSS_AGGREGATIONS)}")


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's length-normalised sequence log-ratio, broadcast to every token: [B, R] -> [B, R].
    (1/|y_i|) sum_t (logp_it - old_logp_it); the gradient flows to every token of the row through the mean."""
    return masked_mean(log_ratio, mask, dim=-1).unsqueeze(-1).expand_as(log_ratio)


def importance_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                     level: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """(r [B, R] with its graph, the per-token log-ratio zeroed off the mask): r = exp(logp - old_logp) per token
    (level="token") or GSPO's one sequence ratio exp(mean_t log-ratio) on every token of the row ("sequence")."""
    token_log_ratio = zero_masked(logprobs - old_logprobs, mask)  # zeroed first: exp(garbage) could overflow
    if level == "sequence":
        return torch.exp(sequence_log_ratio(token_log_ratio, mask)), token_log_ratio
    if level != "token":
        raise ValueError(f"unknown importance sampling level {level!r}; choose token or sequence")
    return torch.exp(token_log_ratio), token_log_ratio


def ratio_stats(ratio: torch.Tensor, token_log_ratio: torch.Tensor, mask: torch.Tensor) -> Stats:
    """What every policy loss logs of its ratio: approx_kl = masked mean of 0.5 (logp - old_logp)^2, ratio_mean."""
    return {"approx_kl": masked_mean(0.5 * token_log_ratio.pow(2), mask), "ratio_mean": masked_mean(ratio, mask)}


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    *,
    clip_eps_high: float | None = None,
    level: str = "token",
    agg: str = "token_mean",
    max_len: int | None = None,
    denom: float | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """Clipped PPO surrogate (Schulman et al. 2017), [B, R] inputs -> 0-d loss.

    ratio r = exp(logprobs - old_logprobs) per token (level="token"), or GSPO's one ratio per sequence
    exp(mean_t log-ratio) (level="sequence"); per token max(-A r, -A clip(r, 1 - e_low, 1 + e_high)) with
    e_low = clip_eps and e_high = clip_eps_high (default: clip_eps); reduced with `aggregate(agg, denom=denom)`.
    weights: a per-token factor [B, R] on that term, used detached (`algorithms.correction`: truncated IS).
    stats: clipfrac = share of counted tokens where the clipped term is the larger one (strictly); of which
           clipfrac_low (r < 1 - e_low, A < 0) and clipfrac_high (r > 1 + e_high, A > 0);
           approx_kl = masked mean of 0.5 (logprobs - old_logprobs)^2, ratio_mean = masked mean of r.
    """
    ratio, token_log_ratio = importance_ratio(logprobs, old_logprobs, mask, level)
    advantages = zero_masked(advantages, mask)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights.detach()
    loss = aggregate(per_token, mask, agg, max_len=max_len, denom=denom)
    with torch.no_grad():
        was_clipped = clipped > unclipped
        stats = {
            "clipfrac": masked_mean(was_clipped.float(), mask),
            "clipfrac_low": masked_mean((was_clipped & (ratio < 1.0 - clip_eps)).float(), mask),
            "clipfrac_high": masked_mean((was_clipped & (ratio > 1.0 + high)).float(), mask),
            **ratio_stats(ratio, token_log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None,
    agg: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = masked_mean,
) -> tuple[torch.Tensor, Stats]:
    """Clipped critic loss (PPO2 / DeepSpeed-Chat), [B, R] inputs -> 0-d loss.

    v_clip = old + clip(v - old, -e, e); per token 0.5 * max((v - R)^2, (v_clip - R)^2), reduced by `agg` (default
    the masked mean; a trainer passes the policy loss's aggregation, so the critic's gradient does not depend on
    how a mini-batch is cut into micro-batches). clip_eps=None gives the plain 0.5 * agg of (v - R)^2.
    stats: clipfrac = share of counted tokens where the clipped error is the larger one (strictly),
           values_mean = masked mean of v.
    """
    values = zero_masked(values, mask)
    old_values = zero_masked(old_values, mask)
    returns = zero_masked(returns, mask)
    err = (values - returns).pow(2)
    if clip_eps is None:
        err_clipped = err
    else:
        v_clip = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        err_clipped = (v_clip - returns).pow(2)
    loss = 0.5 * agg(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((err_clipped > err).float(), mask),
            "values_mean": masked_mean(values, mask),
        }
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, [B, R, V] -> [B, R] (fp32).

    H = logsumexp(z) - sum_v p_v z_v. Computed one row at a time so only one [R, V] fp32 copy is live.
    """
    rows = []
    for row in logits:
        z = row.float()
        rows.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1))
    return torch.stack(rows)


def mean_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean entropy (0-d) of logits [B, R, V] over mask [B, R]; the bonus is `loss - coef * this`."""
    return masked_mean(entropy_from_logits(logits), mask)


def pairwise_reward_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, Stats]:
    """Bradley-Terry reward-model loss on B pairs: r_chosen, r_rejected, margin [B] -> 0-d loss.

    L = mean(-logsigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)
    (the margin term is Llama-2's; the centring term keeps rewards near 0, TRL's center_rewards_coefficient).
    stats: accuracy = share with r_c > r_r (ties count as wrong), chosen / rejected = mean rewards,
           margin = mean(r_c - r_r).
    """
    diff = r_chosen - r_rejected
    logits = diff if margin is None else diff - margin.to(diff.dtype)
    loss = -F.logsigmoid(logits).mean()
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected).pow(2).mean()
    with torch.no_grad():
        stats = {
            "accuracy": (diff > 0).float().mean(),
            "chosen": r_chosen.float().mean(),
            "rejected": r_rejected.float().mean(),
            "margin": diff.float().mean(),
        }
    return loss, stats


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens] per position: logits [B, T, V], tokens [B, T] (valid ids) -> [B, T] fp32.

    No shift here: to score the tokens of a sequence, pass logits[:, :-1] and input_ids[:, 1:].
    Computed as gathered logit - logsumexp, one row at a time, so the full [B, T, V] log-softmax is
    never materialised (and bf16 logits are upcast only one row at a time).
    """
    rows = []
    for row_logits, row_tokens in zip(logits, tokens, strict=True):
        picked = row_logits.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1).float()
        rows.append(picked - torch.logsumexp(row_logits.float(), dim=-1))
    return torch.stack(rows)

