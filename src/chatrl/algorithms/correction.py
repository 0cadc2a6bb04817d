"""Corrections for the gap between the policy that sampled a rollout and the policy the trainer scores.

The rollout is sampled from the Hybrid Engine's inference copy (often bf16, another attention kernel), while
the update's old log-probs come from the training actor: the two disagree by rounding (more in bf16, a lot when
the copy is stale). Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly
brings you off-policy RL training"; veRL's rollout_is) reweights each token's policy-gradient term by

    w_t = min(exp(old_logp_t - sampler_logp_t), cap)      (detached: a weight, not a path for the gradient)

so the update estimates the gradient of the trainer's policy from samples of the sampler's. Masked importance
sampling (MIS; veRL's rollout_is mask mode) drops instead the tokens whose ratio leaves a band:

    w_t = 1 if low <= exp(old_logp_t - sampler_logp_t) <= cap else 0      (low default 1 / cap)

(a dropped token adds 0 to the loss and its gradient; it still counts in the aggregation's denominator, as the
weight multiplies each token's term). Shapes: [B, R]; mask 1 = an action token that counts. Each function takes
(old_logprobs, sampler_logprobs, mask, cap, low=None) and returns (weight [B, R], stats of detached 0-d tensors);
the weight is 1 on masked positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from chatrl.algorithms.masked import masked_mean, zero_masked

Stats = dict[str, torch.Tensor]
Correction = Callable[..., tuple[torch.Tensor, Stats]]  # (old, sampler, mask, cap, low=None) -> (weight, stats)


def truncated_is_weight(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                        cap: float, low: float | None = None) -> tuple[torch.Tensor, Stats]:
    """TIS weight min(exp(old_logprobs - sampler_logprobs), cap) per token, detached; 1 where mask is 0 (low is
    unused). stats: is_weight_mean = masked mean of the weight, is_capped_frac = share of counted tokens at the cap
    (raw ratio > cap)."""
    with torch.no_grad():
        ratio = torch.exp(zero_masked(old_logprobs.detach().float() - sampler_logprobs.float(), mask))
        weight = ratio.clamp(max=cap)
        stats = {"is_weight_mean": masked_mean(weight, mask), "is_capped_frac": masked_mean((ratio > cap).float(), mask)}
    return weight, stats


def masked_is_weight(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                     cap: float, low: float | None = None) -> tuple[torch.Tensor, Stats]:
    """MIS weight per token, detached: 1 where low <= exp(old_logprobs - sampler_logprobs) <= cap (low default
    1 / cap), 0 outside the band (the token leaves the loss); 1 where mask is 0.
    stats: is_weight_mean = share of counted tokens kept, is_masked_frac = share dropped, of which
    is_masked_frac_low (ratio < low) and is_masked_frac_high (ratio > cap)."""
    low = 1.0 / cap if low is None else low
    with torch.no_grad():
        ratio = torch.exp(zero_masked(old_logprobs.detach().float() - sampler_logprobs.float(), mask))
        below, above = ratio < low, ratio > cap
        weight = (~(below | above) | ~mask.bool()).float()
        stats = {"is_weight_mean": masked_mean(weight, mask), "is_masked_frac": masked_mean(1.0 - weight, mask),
                 "is_masked_frac_low": masked_mean(below.float(), mask),
                 "is_masked_frac_high": masked_mean(above.float(), mask)}
    return weight, stats


def no_correction(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                  cap: float, low: float | None = None) -> tuple[torch.Tensor, Stats]:
    """Weight 1 everywhere (the rollout is treated as on-policy); no stats."""
    return torch.ones_like(old_logprobs, dtype=torch.float32), {}


IS_CORRECTIONS: dict[str, Correction] = {"none": no_correction, "tis": truncated_is_weight, "mis": masked_is_weight}
