"""On-policy distillation's per-token advantage (algorithms/distill.py) against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from chatrl.algorithms.distill import distill_advantages, reverse_kl_advantages

# two rows; row 0: three actions; row 1: an action, an environment token (mask 0) inside the response, an action,
# then padding
TEACHER = torch.tensor([[-0.5, -2.0, -1.0, -3.0], [-0.1, -7.0, -4.0, float("nan")]])
STUDENT = torch.tensor([[-1.5, -0.5, -1.0, -9.0], [-2.1, -0.2, -3.0, -1.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]])


def test_reverse_kl_advantage_by_hand() -> None:
    # A_t = log p_T - log p_S: -0.5 - (-1.5) = 1.0; -2.0 - (-0.5) = -1.5; -1 - (-1) = 0; -0.1 - (-2.1) = 2.0;
    # -4 - (-3) = -1.0; padding and the environment token: exactly 0 (even where the teacher's value is NaN)
    expected = torch.tensor([[1.0, -1.5, 0.0, 0.0], [2.0, 0.0, -1.0, 0.0]])
    assert_close(reverse_kl_advantages(TEACHER, STUDENT, MASK), expected)


def test_environment_tokens_and_padding_get_zero_advantage() -> None:
    adv = reverse_kl_advantages(TEACHER, STUDENT, MASK)
    assert (adv[MASK == 0] == 0).all()
    assert (TEACHER - STUDENT)[1, 1] != 0  # the environment token's log-probs differ, its advantage is still 0


def test_a_student_equal_to_its_teacher_gets_exactly_zero() -> None:
    logp = torch.log_softmax(torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0)), -1)[..., 0]
    adv = reverse_kl_advantages(logp, logp.clone(), torch.ones(3, 5))
    assert torch.equal(adv, torch.zeros(3, 5))


def test_student_logprobs_are_detached() -> None:
    student = STUDENT.clone().requires_grad_(True)
    assert not reverse_kl_advantages(TEACHER, student, MASK).requires_grad


def test_mixed_with_the_environment_advantage_by_hand() -> None:
    env = torch.tensor([[0.8, 0.8, 0.8, 0.8], [-0.4, -0.4, -0.4, -0.4]])
    # w = 0.25: 0.25 * A_distill + 0.75 * A_env on actions, 0 elsewhere
    # row 0: 0.25 + 0.6 = 0.85; -0.375 + 0.6 = 0.225; 0 + 0.6 = 0.6; row 1: 0.5 - 0.3 = 0.2; -0.25 - 0.3 = -0.55
    expected = torch.tensor([[0.85, 0.225, 0.6, 0.0], [0.2, 0.0, -0.55, 0.0]])
    assert_close(distill_advantages(TEACHER, STUDENT, MASK, env, teacher_weight=0.25), expected)
    # w = 1: pure distillation, no environment advantage needed; w = 0: the environment's (masked)
    assert_close(distill_advantages(TEACHER, STUDENT, MASK), reverse_kl_advantages(TEACHER, STUDENT, MASK))
    assert_close(distill_advantages(TEACHER, STUDENT, MASK, env, teacher_weight=0.0), env * MASK)


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_a_weight_outside_0_1_is_refused(weight: float) -> None:
    with pytest.raises(ValueError, match="teacher_weight"):
        distill_advantages(TEACHER, STUDENT, MASK, torch.zeros_like(MASK), teacher_weight=weight)


def test_a_mixed_weight_needs_the_environment_advantages() -> None:
    with pytest.raises(ValueError, match="environment"):
        distill_advantages(TEACHER, STUDENT, MASK, None, teacher_weight=0.5)
