"""The policy losses a config names (`grpo.policy_loss` / `ppo.policy_loss`): POLICY_LOSSES, name -> pure function.

All take the same [B, R] inputs as `losses.policy_loss` (PPO-clip, the default) and return (0-d loss, stats of
DETACHED 0-d tensors); r_t = exp(logp_t - old_logp_t) per token, or GSPO's one sequence ratio
exp(mean_t' (logp_t' - old_logp_t')) for every token of the row (level="sequence"); per-token terms are reduced
with `losses.aggregate` and multiplied by a detached per-token weight when given (`algorithms.correction`).

  ppo_clip  max(-A r, -A clip(r, 1 - e_low, 1 + e_high))          a token outside the band on the side that
                                                                  would improve it gets no gradient
  cispo     -sg(clip(r, 1 - e_low, 1 + e_high)) * A * logp        (MiniMax-M1, arXiv 2506.13585) REINFORCE with a
                                                                  clipped, stop-gradient IS weight: every token
                                                                  keeps a gradient, -clip(r) A d logp
  sapo      -(4 / tau) * sigmoid(tau * (r - 1)) * A,              (Qwen, arXiv 2511.20347) a soft gate in place
            tau = tau_pos where A > 0, else tau_neg                of the clip: d/d logp = -A * 4 s (1 - s) * r,
                                                                  s = sigmoid(tau (r - 1)); at r = 1 the plain
                                                                  policy gradient -A d logp
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from chatrl.algorithms.losses import aggregate, importance_ratio, policy_loss, ratio_stats
from chatrl.algorithms.masked import masked_mean, zero_masked

Stats = dict[str, torch.Tensor]

SAPO_TAU_POS = 1.0   # the paper's temperatures (arXiv 2511.20347; also veRL's, ms-swift's and Trinity-RFT's defaults):
SAPO_TAU_NEG = 1.05  # tau_neg > tau_pos, so negative-advantage tokens are gated off faster (they spread mass)


def cispo_loss(
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
    """CISPO (MiniMax-M1): per token -sg(clip(r, 1 - e_low, 1 + e_high)) * A * logp, reduced with `aggregate`.

    e_low = clip_eps, e_high = clip_eps_high (default clip_eps); the weight is detached, so the gradient is
    -clip(r) A d logp on every counted token, the clipped ones included (PPO-clip's is 0 there).
    stats: clipfrac = share of counted tokens whose weight was clipped (r < 1 - e_low or r > 1 + e_high, whatever
           the advantage's sign), split into clipfrac_low / clipfrac_high; approx_kl, ratio_mean as PPO-clip's.
    """
    ratio, token_log_ratio = importance_ratio(logprobs, old_logprobs, mask, level)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    weight = ratio.detach().clamp(1.0 - clip_eps, 1.0 + high)
    per_token = -weight * zero_masked(advantages, mask) * zero_masked(logprobs, mask)
    if weights is not None:
        per_token = per_token * weights.detach()
    loss = aggregate(per_token, mask, agg, max_len=max_len, denom=denom)
    with torch.no_grad():
        low_side, high_side = ratio < 1.0 - clip_eps, ratio > 1.0 + high
        stats = {
            "clipfrac": masked_mean((low_side | high_side).float(), mask),
            "clipfrac_low": masked_mean(low_side.float(), mask),
            "clipfrac_high": masked_mean(high_side.float(), mask),
            **ratio_stats(ratio, token_log_ratio, mask),
        }
    return loss, stats


def sapo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = None,
    *,
    clip_eps_high: float | None = None,
    level: str = "token",
    agg: str = "token_mean",
    max_len: int | None = None,
    denom: float | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    tau_pos: float = SAPO_TAU_POS,
    tau_neg: float = SAPO_TAU_NEG,
) -> tuple[torch.Tensor, Stats]:
    """SAPO (Qwen): per token -(4 / tau) sigmoid(tau (r - 1)) * A with tau = tau_pos where A > 0, else tau_neg,
    reduced with `aggregate`. clip_eps / clip_eps_high are accepted for the common signature and unused.

    The gradient is the gate's derivative times A: d/d logp_t = -A 4 s (1 - s) r (s = sigmoid(tau (r - 1))),
    1 * (-A) at r = 1 (the plain policy gradient), decaying smoothly as r leaves 1 instead of a hard cut.
    stats: gate_mean = masked mean of the gradient's gate 4 s (1 - s) (1 = no attenuation), gatefrac = share of
           counted tokens whose gate is below 0.5 (more than half of the gradient gated off: |tau (r - 1)| > 1.76);
           approx_kl, ratio_mean as PPO-clip's.
    """
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"SAPO temperatures must be > 0, got tau_pos={tau_pos}, tau_neg={tau_neg}")
    ratio, token_log_ratio = importance_ratio(logprobs, old_logprobs, mask, level)
    advantages = zero_masked(advantages, mask)
    tau = torch.where(advantages > 0, tau_pos, tau_neg).to(ratio.dtype)
    soft = torch.sigmoid(tau * (ratio - 1.0))
    per_token = -(4.0 / tau) * soft * advantages
    if weights is not None:
        per_token = per_token * weights.detach()
    loss = aggregate(per_token, mask, agg, max_len=max_len, denom=denom)
    with torch.no_grad():
        gate = 4.0 * soft * (1.0 - soft)
        stats = {
            "gate_mean": masked_mean(gate, mask),
            "gatefrac": masked_mean((gate < 0.5).float(), mask),
            **ratio_stats(ratio, token_log_ratio, mask),
        }
    return loss, stats


POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, Stats]]] = {
    "ppo_clip": policy_loss,
    "cispo": cispo_loss,
    "sapo": sapo_loss,
}
