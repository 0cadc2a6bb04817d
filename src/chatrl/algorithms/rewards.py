"""Turn sequence scores into per-token PPO rewards (the DeepSpeed-Chat / TRL / InstructGPT shaping).

    r_t = -beta * kl_t                            for every response token t (mask == 1)
    r_T = -beta * kl_T + clip(score, -c, c)       at the LAST response token T (last mask == 1 position)
    r_t = 0                                       on padding (mask == 0)

Shapes: B = batch, R = response length; masks are 1 on generated tokens up to and including EOS, 0 after.

Also: DAPO's soft overlong penalty on the response length, and the placement of a multi-turn episode's
per-turn rewards on the token that ended each turn (discounted per turn).

The episode's outcome, the one number dynamic sampling, logging, RFT's selection and the advantages compare, is
final_reward(score) + sum_k gamma^k r_k: the score is clipped, and discounted like the environment's reward of
the last turn, whose last token it shares. A trainer passes `final_reward`'s output as `scores` (no second clip).
"""

from __future__ import annotations

import torch

from chatrl.algorithms.masked import zero_masked


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of the last mask == 1 entry of each row, [B, R] -> [B] (long); 0 for an all-zero row."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(dim=-1)


def shape_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    clip: float | None = None,
) -> torch.Tensor:
    """Per-token rewards [B, R] from scores [B], per-token kl [B, R] and mask [B, R] (formula: module doc).

    `clip` (c > 0) clamps the score to [-c, c] before it is added (DeepSpeed-Chat's clip_reward_value).
    A row with no response token at all (mask all 0) gets no reward anywhere.
    """
    rewards = zero_masked(-beta * kl, mask)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    has_token = mask.bool().any(dim=-1)
    bonus = torch.where(has_token, scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    return rewards.scatter_add(1, last_token_index(mask).unsqueeze(1), bonus.unsqueeze(1))


def final_reward(score: torch.Tensor, discount: torch.Tensor | float, clip: float | None = None) -> torch.Tensor:
    """The final score as the episode's return counts it, [B] -> [B]: clamped to [-clip, clip] (clip > 0;
    DeepSpeed-Chat's clip_reward_value), times `discount` ([B] or a float): gamma^k of the last turn k, since the
    score lands on that turn's last generated token, as that turn's environment reward does (`turn_rewards`)."""
    if clip is not None:
        score = score.clamp(-clip, clip)
    return score * discount


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) per response, lengths [B] -> [B]:

        0                                       if L <= max_len - buffer
        -factor * (L - (max_len - buffer)) / buffer   if max_len - buffer < L <= max_len (linear ramp to -factor)
        -factor                                 if L > max_len
    buffer = 0 gives no ramp (0, then -factor above max_len)."""
    lengths = lengths.float()
    if buffer <= 0:
        return torch.where(lengths > max_len, -factor, 0.0)
    ramp = -factor * (lengths - (max_len - buffer)) / buffer
    return torch.where(lengths <= max_len - buffer, 0.0, torch.where(lengths <= max_len, ramp, -factor))


def turn_rewards(values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, length: int,
                 gamma: float = 1.0) -> torch.Tensor:
    """Per-turn rewards of multi-turn episodes as token rewards [B, length].

    values [B, K]: reward of turn k; positions [B, K] (long): the response column of the token that ended turn
    k (its last generated token); valid [B, K]: the turn happened. Turn k's reward is discounted by gamma^k and
    added at its position, so a row's reward sum is the discounted episode return sum_k gamma^k r_k."""
    discount = gamma ** torch.arange(values.shape[1], dtype=torch.float32, device=values.device)
    placed = torch.where(valid.bool(), values.float() * discount, 0.0)
    out = torch.zeros(values.shape[0], length, dtype=torch.float32, device=values.device)
    return out.scatter_add(1, positions.clamp(0, max(length - 1, 0)).long(), placed)
