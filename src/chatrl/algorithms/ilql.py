"""Implicit Language Q-Learning (Snell et al. 2022) as pure tensor functions.

A language model is an MDP whose state s_t is the token prefix up to position t and whose action a_t is the
next token (input_ids[:, t + 1]). Shapes: B = batch, T = positions, V = vocabulary. mask [B, T]: 1 where a_t is
an action that counts (a reply token), 0 on prompt / environment / padding positions; values there never change
a result. Q heads give a value per vocabulary entry, Q(s_t, .) [B, T, V]; the V head one per state, V(s_t) [B, T].

  next_action_values  V'(t) = V(s_t') at the next counted position t' > t of the row, 0 if none (after the last
                      token the episode is over, so V = 0)
  bellman_targets     y_t = r_t + gamma * V'(t)          (V detached: a fixed regression target)
  q_bellman_loss      L_Q = sum_heads mean_t (Q_k(s_t, a_t) - y_t)^2
  expectile_loss      L_V = mean_t |tau - 1(u_t < 0)| u_t^2,  u_t = Qhat(s_t, a_t) - V(s_t),
                      Qhat = min of the two TARGET Q heads (detached); tau > 0.5 pushes V toward the upper
                      expectile of Q, i.e. toward max_a Q over the actions the data supports
  cql_loss            L_CQL = sum_heads mean_t [logsumexp_v Q_k(s_t, v) - Q_k(s_t, a_t)]   (conservative: pushes
                      down Q of tokens the data never took)
  awac_loss           L_LM = mean_t -log softmax(z_t)[a_t]   (the LM loss ILQL keeps alongside; trlx calls it
                      "awac" with unit weights)
  ilql_loss           L = L_Q + L_V + cql_alpha * L_CQL + awac_weight * L_LM
  polyak_update       theta_target <- (1 - alpha) * theta_target + alpha * theta   (after each optimizer step)
  guided_logits       z'_t = z_t + beta * (Q(s_t, .) - V(s_t))   (decoding: pi(a|s) ~ pi_LM(a|s) exp(beta A(s, a)))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from chatrl.algorithms.losses import token_logprobs
from chatrl.algorithms.masked import masked_mean, zero_masked

Stats = dict[str, torch.Tensor]


def _safe_actions(actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Action ids with masked positions set to 0, so a -100 / pad there can never index out of range."""
    return torch.where(mask.bool(), actions, torch.zeros_like(actions))


def gather_actions(q_logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Q(s_t, a_t): q_logits [B, T, V], actions [B, T] -> [B, T] (0 at masked positions)."""
    picked = q_logits.gather(-1, _safe_actions(actions, mask).unsqueeze(-1)).squeeze(-1)
    return zero_masked(picked, mask)


def next_action_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """V at the next counted position of each row, 0 after the row's last one. values, mask [B, T] -> [B, T].

    For a single reply the next counted position is t + 1; in a multi-turn row the tokens the environment wrote
    in between are skipped (they are the transition, not actions)."""
    b, t = values.shape
    pos = torch.arange(t, device=values.device).expand(b, t)
    # index of the first counted position at or after each position (t = none), then shifted by one
    marked = torch.where(mask.bool(), pos, torch.full_like(pos, t))
    first_at_or_after = marked.flip(-1).cummin(-1).values.flip(-1)
    nxt = torch.cat([first_at_or_after[:, 1:], torch.full_like(pos[:, :1], t)], dim=1)  # [B, T]
    padded = torch.cat([values, torch.zeros_like(values[:, :1])], dim=1)  # column t = "after the end" = 0
    return zero_masked(padded.gather(1, nxt), mask)


def bellman_targets(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """y_t = r_t + gamma * V(s_next) (detached), rewards/values/mask [B, T] -> [B, T], 0 at masked positions."""
    return zero_masked(rewards + gamma * next_action_values(values.detach(), mask), mask)


def q_bellman_loss(q_taken: Sequence[torch.Tensor], targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over Q heads of the masked mean of (Q_k(s_t, a_t) - y_t)^2. Each q_taken[k], targets: [B, T] -> 0-d."""
    y = targets.detach()
    return sum(masked_mean((zero_masked(q, mask) - y).pow(2), mask) for q in q_taken)  # type: ignore[return-value]


def expectile_loss(q_target: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Expectile regression of V toward Qhat: masked mean of |tau - 1(u < 0)| u^2, u = Qhat - V. [B, T] -> 0-d.
    Qhat is detached: only V learns from this term."""
    u = zero_masked(q_target.detach() - values, mask)
    weight = torch.where(u < 0, 1.0 - tau, tau)
    return masked_mean(weight * u.pow(2), mask)


def cql_loss(q_logits: Sequence[torch.Tensor], actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over Q heads of the masked mean of logsumexp_v Q_k(s_t, v) - Q_k(s_t, a_t). q_logits[k]: [B, T, V]."""
    safe = _safe_actions(actions, mask)
    return sum(masked_mean(-token_logprobs(q, safe), mask) for q in q_logits)  # type: ignore[return-value]


def awac_loss(logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LM negative log-likelihood of the data's actions: masked mean of -log softmax(z_t)[a_t]. logits [B, T, V]."""
    return masked_mean(-token_logprobs(logits, _safe_actions(actions, mask)), mask)


def ilql_loss(
    logits: torch.Tensor,
    q_logits: Sequence[torch.Tensor],
    target_q: torch.Tensor,
    values: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    tau: float,
    cql_alpha: float,
    awac_weight: float,
) -> tuple[torch.Tensor, Stats]:
    """The ILQL objective L = L_Q + L_V + cql_alpha * L_CQL + awac_weight * L_LM (module docstring).

    logits [B, T, V] (the LM), q_logits: one [B, T, V] per online Q head, target_q [B, T] = Qhat(s_t, a_t) (min of
    the target heads at the taken actions), values [B, T] = V(s_t), actions/rewards/mask [B, T].
    stats (detached 0-d): loss_q, loss_v, loss_cql, loss_awac, q_mean (online heads at a_t), v_mean, target_mean.
    """
    q_taken = [gather_actions(q, actions, mask) for q in q_logits]
    targets = bellman_targets(rewards, values, mask, gamma)
    loss_q = q_bellman_loss(q_taken, targets, mask)
    loss_v = expectile_loss(target_q, values, mask, tau)
    loss_cql = cql_loss(q_logits, actions, mask) if cql_alpha else values.new_zeros(())
    loss_lm = awac_loss(logits, actions, mask) if awac_weight else values.new_zeros(())
    loss = loss_q + loss_v + cql_alpha * loss_cql + awac_weight * loss_lm
    with torch.no_grad():
        stats = {
            "loss_q": loss_q.detach(), "loss_v": loss_v.detach(), "loss_cql": loss_cql.detach(),
            "loss_awac": loss_lm.detach(),
            "q_mean": masked_mean(torch.stack(q_taken).mean(0), mask),
            "v_mean": masked_mean(values, mask),
            "target_mean": masked_mean(targets, mask),
        }
    return loss, stats


@torch.no_grad()
def polyak_update(targets: Iterable[torch.Tensor], online: Iterable[torch.Tensor], alpha: float) -> None:
    """In place, pairwise: target <- (1 - alpha) * target + alpha * online (alpha = 1 copies, 0 freezes)."""
    for t, o in zip(targets, online, strict=True):
        t.mul_(1.0 - alpha).add_(o.detach().to(t.dtype), alpha=alpha)


def guided_logits(logits: torch.Tensor, q: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """z + beta * (Q - V): logits, q [..., V]; values [...] (one per state). beta = 0 returns logits unchanged.
    V is constant over the vocabulary, so it does not change the sampled distribution, only the logits' level."""
    if beta == 0:
        return logits
    return logits + beta * (q - values.unsqueeze(-1))

