"""Truncated and masked importance sampling (`algorithms.correction`): the weights min(exp(old - sampler), cap) and
1[low <= exp(old - sampler) <= cap] by hand, that they carry no gradient, and the policy losses they multiply."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from chatrl.algorithms.correction import IS_CORRECTIONS, masked_is_weight, truncated_is_weight
from chatrl.algorithms.losses import policy_loss
from chatrl.algorithms.policy_losses import cispo_loss

OLD = [[-1.0, -0.2, -2.0, 0.3]]
SAMPLER = [[-1.0, -1.2, -0.5, 0.0]]  # raw ratios exp(0) = 1, exp(1) = 2.718 (> cap), exp(-1.5) = 0.2231; masked
MASK = [[1.0, 1.0, 1.0, 0.0]]


def test_tis_weight_by_hand():
    weight, stats = truncated_is_weight(torch.tensor(OLD), torch.tensor(SAMPLER), torch.tensor(MASK), cap=2.0)
    assert_close(weight, torch.tensor([[1.0, 2.0, math.exp(-1.5), 1.0]]))
    assert_close(stats["is_weight_mean"], torch.tensor((1.0 + 2.0 + math.exp(-1.5)) / 3))
    assert_close(stats["is_capped_frac"], torch.tensor(1 / 3))
    loose, _ = truncated_is_weight(torch.tensor(OLD), torch.tensor(SAMPLER), torch.tensor(MASK), cap=5.0)
    assert_close(loose[0, 1], torch.tensor(math.e))


def test_tis_weight_carries_no_gradient_and_scales_each_tokens_term():
    old = torch.tensor(OLD, requires_grad=True)
    sampler = torch.tensor(SAMPLER, requires_grad=True)
    weight, _ = IS_CORRECTIONS["tis"](old, sampler, torch.tensor(MASK), 2.0)
    assert not weight.requires_grad and weight.grad_fn is None
    # at ratio 1 (logprobs = old) the token-mean loss is -sum_t A_t w_t / 3, so d/d logp_t = -A_t w_t / 3
    logprobs = torch.tensor(OLD, requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -2.0, 5.0]])
    loss, _ = policy_loss(logprobs, old.detach(), adv, torch.tensor(MASK), 0.2, weights=weight)
    w = math.exp(-1.5)
    assert_close(loss, torch.tensor(-(1.0 + 2.0 - 2.0 * w) / 3))
    loss.backward()
    assert_close(logprobs.grad, torch.tensor([[-1 / 3, -2 / 3, 2 * w / 3, 0.0]]))
    assert old.grad is None and sampler.grad is None


def test_no_correction_is_weight_one():
    weight, stats = IS_CORRECTIONS["none"](torch.tensor(OLD), torch.tensor(SAMPLER), torch.tensor(MASK), 2.0)
    assert torch.equal(weight, torch.ones(1, 4)) and stats == {}


def test_mis_weight_by_hand():
    """Ratios 1, e = 2.718, exp(-1.5) = 0.2231 (and a masked token): the default band [1 / cap, cap] = [0.5, 2] keeps
    the first only; [0.2, 3] keeps all three; [1 / 3, 3] drops the low one."""
    old, sampler, mask = torch.tensor(OLD), torch.tensor(SAMPLER), torch.tensor(MASK)
    weight, stats = IS_CORRECTIONS["mis"](old, sampler, mask, 2.0)
    assert torch.equal(weight, torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    assert_close(stats["is_weight_mean"], torch.tensor(1 / 3))
    assert_close(stats["is_masked_frac"], torch.tensor(2 / 3))
    assert_close(stats["is_masked_frac_low"], torch.tensor(1 / 3))
    assert_close(stats["is_masked_frac_high"], torch.tensor(1 / 3))
    wide, stats = masked_is_weight(old, sampler, mask, 3.0, 0.2)
    assert torch.equal(wide, torch.ones(1, 4)) and stats["is_masked_frac"].item() == 0
    assert torch.equal(masked_is_weight(old, sampler, mask, 3.0)[0], torch.tensor([[1.0, 1.0, 0.0, 1.0]]))


def test_mis_drops_tokens_from_the_gradient_even_under_cispo():
    """CISPO keeps every token's gradient -w A / N; MIS's weight 0 takes the out-of-band tokens out of it. At
    logprobs = old (r = 1, w = 1) with A = [1, 1, -2]: loss = -(1 * 1 * -1.0) / 3 = 1/3, gradient [-1/3, 0, 0]
    (without MIS: [-1/3, -1/3, 2/3])."""
    old, sampler, mask = torch.tensor(OLD, requires_grad=True), torch.tensor(SAMPLER), torch.tensor(MASK)
    weight, _ = IS_CORRECTIONS["mis"](old, sampler, mask, 2.0)
    assert not weight.requires_grad
    adv = torch.tensor([[1.0, 1.0, -2.0, 5.0]])
    logprobs = torch.tensor(OLD, requires_grad=True)
    loss, _ = cispo_loss(logprobs, old.detach(), adv, mask, 0.2, weights=weight)
    assert_close(loss, torch.tensor(1 / 3))
    loss.backward()
    assert_close(logprobs.grad, torch.tensor([[-1 / 3, 0.0, 0.0, 0.0]]))
    plain = torch.tensor(OLD, requires_grad=True)
    cispo_loss(plain, old.detach(), adv, mask, 0.2)[0].backward()
    assert_close(plain.grad, torch.tensor([[-1 / 3, -1 / 3, 2 / 3, 0.0]]))
