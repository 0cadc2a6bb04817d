"""Advantage estimators over response tokens. B = batch, R = response length.

mask [B, R]: 1 = a generated token (an action), 0 = padding after EOS (or any token that is not an
action, e.g. a tool output inside the response). Masked positions are SKIPPED: their rewards and
values are never read, they get advantage 0 and return 0, and the recursion carries straight over
them (veRL's treatment). After the last real token the episode ends: V = 0 there. For right-padded
masks this is exactly the textbook GAE on each row's real tokens.

  gae:          delta_t = r_t + gamma * V_{t+1} - V_t;   A_t = delta_t + gamma * lam * A_{t+1};
                returns R_t = A_t + V_t  (the critic's regression target)
  grpo:         one outcome s_i per response (its total reward: the episode return), rows [g*G, (g+1)*G) are
                the G samples of prompt g: A_i = (s_i - mean_g) / (std_g + eps) on every token of row i
  dr_grpo:      Dr. GRPO (Liu et al. 2025): A_i = s_i - mean_g (no division by the group's std)
  rloo:         REINFORCE leave-one-out (Ahmadian et al. 2024): A_i = s_i - mean_{j != i} s_j
                = G / (G - 1) * (s_i - mean_g)
  reinforce_pp: REINFORCE++ (Hu 2025): G_t = r_t + gamma * G_{t+1} (discounted return-to-go), and
                A = masked_whiten(G) over the whole batch (all ranks: pass `moments`)
All but gae need no critic. The group-relative ones and reinforce_pp are already normalised: `whitenable`
is False for them, so a trainer never whitens them a second time (which would give the tokens of a tied
group, whose advantages are exactly 0, non-zero advantages).

`ADVANTAGE_ESTIMATORS[name].fn(rewards, values, mask, gamma=, lam=, group_size=, moments=) -> (adv, returns)`
gives one call shape for all (unused arguments are ignored); `compute_advantages` looks a name up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from chatrl.algorithms.masked import Moments, local_moments, masked_sum, masked_whiten, zero_masked
from chatrl.algorithms.registry import lookup


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016), vectorised over the batch.

    rewards, values, mask: [B, R] -> advantages, returns: [B, R] (0 on masked positions).
    One backward python loop over R, carrying V_{t+1} and A_{t+1} of the next REAL token of each row.
    """
    real = mask.bool()
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        # Masked step: keep the carried state, so padding/holes neither end nor feed the recursion.
        next_adv = torch.where(real[:, t], adv_t, next_adv)
        next_value = torch.where(real[:, t], values[:, t], next_value)
        advantages[:, t] = next_adv
    advantages = zero_masked(advantages, mask)
    returns = zero_masked(advantages + values, mask)
    return advantages, returns


def grpo_advantages(
    scores: torch.Tensor,
    group_size: int,
    mask: torch.Tensor,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """Group-normalised outcome advantage (GRPO, Shao et al. 2024), broadcast to every response token.

    scores [B] with B = n_groups * group_size, grouped as consecutive rows; mask [B, R] -> [B, R].
    A_i = (s_i - mean_g) / (std_g + eps), std unbiased (n - 1); a group of one has std 0 and A = 0.
    scale_by_std=False gives Dr. GRPO's A_i = s_i - mean_g.
    """
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"batch of {scores.shape[0]} scores is not a whole number of groups of {group_size}")
    groups = scores.float().reshape(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = (centred.pow(2).sum(dim=1, keepdim=True) / max(group_size - 1, 1)).sqrt()
        centred = centred / (std + eps)
    per_seq = centred.reshape(-1).to(scores.dtype if scores.is_floating_point() else torch.float32)
    return zero_masked(per_seq.unsqueeze(1).expand(mask.shape), mask)


def rloo_advantages(scores: torch.Tensor, group_size: int, mask: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline (RLOO): A_i = s_i - (sum_g - s_i) / (G - 1), broadcast to every token of row i.

    scores [B] (B = n_groups * group_size, consecutive rows per group), mask [B, R] -> [B, R]. Needs G >= 2.
    """
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"RLOO needs whole groups of >= 2 samples; got {scores.shape[0]} scores, groups of "
                         f"{group_size}")
    groups = scores.float().reshape(-1, group_size)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    per_seq = (groups - others_mean).reshape(-1)
    return zero_masked(per_seq.unsqueeze(1).expand(mask.shape), mask)


def reinforce_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted return-to-go over real tokens: G_t = r_t + gamma * G_{t'} (t' = next real token), [B, R].

    rewards, mask: [B, R]; G = 0 after the last real token and on masked positions.
    """
    real = mask.bool()
    running = torch.zeros_like(rewards[:, 0])
    returns = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(real[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return zero_masked(returns, mask)


# Registry entries: one call shape (rewards, values, mask, *, gamma, lam, group_size, moments) -> (adv, returns).
# The group-relative ones read the outcome s_i = the row's total reward (score at the last token, per-turn
# environment rewards, and -beta * kl_t when the KL sits in the reward).


def _gae_entry(rewards, values, mask, *, gamma, lam, group_size, moments):
    return gae_advantages(rewards, values, mask, gamma, lam)


def _grpo_entry(rewards, values, mask, *, gamma, lam, group_size, moments):
    advantages = grpo_advantages(masked_sum(rewards, mask, dim=-1), group_size, mask)
    return advantages, advantages


def _dr_grpo_entry(rewards, values, mask, *, gamma, lam, group_size, moments):
    advantages = grpo_advantages(masked_sum(rewards, mask, dim=-1), group_size, mask, scale_by_std=False)
    return advantages, advantages


def _rloo_entry(rewards, values, mask, *, gamma, lam, group_size, moments):
    advantages = rloo_advantages(masked_sum(rewards, mask, dim=-1), group_size, mask)
    return advantages, advantages


def _reinforce_pp_entry(rewards, values, mask, *, gamma, lam, group_size, moments):
    returns = reinforce_returns(rewards, mask, gamma)
    return masked_whiten(returns, mask, moments=moments), returns


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator: its function, whether it reads critic values, whether whitening may follow it,
    and the smallest group size it works with."""

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    needs_critic: bool
    whitenable: bool
    min_group_size: int = 1


ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(_gae_entry, needs_critic=True, whitenable=True),
    "grpo": Estimator(_grpo_entry, needs_critic=False, whitenable=False, min_group_size=2),
    "dr_grpo": Estimator(_dr_grpo_entry, needs_critic=False, whitenable=False, min_group_size=2),
    "rloo": Estimator(_rloo_entry, needs_critic=False, whitenable=False, min_group_size=2),
    "reinforce_pp": Estimator(_reinforce_pp_entry, needs_critic=False, whitenable=False),
}


def compute_advantages(
    kind: str,
    rewards: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    group_size: int = 1,
    whiten: bool = False,
    moments: Moments = local_moments,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both [B, R], with the estimator named `kind` (ValueError if unknown).

    whiten=True normalises the advantages of a `whitenable` estimator (gae) over the batch (`moments` gives the
    statistics, e.g. of all ranks); for the already-normalised estimators it is ignored."""
    est = lookup(ADVANTAGE_ESTIMATORS, kind, "advantage estimator")
    if values is None:
        if est.needs_critic:
            raise ValueError(f"advantage estimator {kind!r} needs critic values")
        values = torch.zeros_like(rewards)
    advantages, returns = est.fn(rewards, values, mask, gamma=gamma, lam=lam, group_size=group_size, moments=moments)
    if whiten and est.whitenable:
        advantages = masked_whiten(advantages, mask, moments=moments)
    return advantages, returns
