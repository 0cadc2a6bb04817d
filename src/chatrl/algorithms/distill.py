"""On-policy distillation (Agarwal et al. 2024, GKD; Thinking Machines 2025): the student samples, a frozen teacher
scores the student's tokens, and each token's advantage is the negative per-token reverse KL

    A_t = log p_teacher(y_t | s_t) - log p_student(y_t | s_t)       (y_t sampled from the student)

whose expectation over the student's samples is -KL(student || teacher) at that state: a policy gradient on it
lowers the reverse KL, token by token (a dense signal, unlike one outcome reward per episode). The student's
log-probs are the rollout's old log-probs (detached: a constant of the update, as any advantage is).

With an environment reward as well, `teacher_weight` w mixes the two: A = w * A_distill + (1 - w) * A_env
(w = 1: pure distillation, the environment's reward is not used; w = 0: plain RL).

Shapes: B = batch, R = response length; mask [B, R] is 1 on the tokens the student generated (actions) and 0 on
padding and on the environment's tokens of multi-turn episodes, which get advantage 0.
"""

from __future__ import annotations

import torch

from chatrl.algorithms.masked import zero_masked


def reverse_kl_advantages(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """A_t = teacher_logprobs - student_logprobs on actions, exactly 0 elsewhere: [B, R] -> [B, R].

    student_logprobs is detached here: it is the sampling policy's log-prob, not the one the update differentiates."""
    return zero_masked(teacher_logprobs - student_logprobs.detach(), mask)


def distill_advantages(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, mask: torch.Tensor,
                       env_advantages: torch.Tensor | None = None, teacher_weight: float = 1.0) -> torch.Tensor:
    """w * reverse_kl_advantages + (1 - w) * env_advantages ([B, R]); w = 1 ignores env_advantages (may be None).
    Off the actions the result is 0 whatever env_advantages holds there."""
    if not 0.0 <= teacher_weight <= 1.0:
        raise ValueError(f"teacher_weight={teacher_weight} must be in [0, 1]")
    distill = reverse_kl_advantages(teacher_logprobs, student_logprobs, mask)
    if teacher_weight == 1.0:
        return distill
    if env_advantages is None:
        raise ValueError(f"teacher_weight={teacher_weight} < 1 mixes in the environment's advantages: pass them")
    return zero_masked(teacher_weight * distill + (1.0 - teacher_weight) * env_advantages, mask)
