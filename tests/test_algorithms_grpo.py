"""The GRPO family's pure math against hand-computed numbers: RLOO / Dr. GRPO advantages, no double
normalisation, loss aggregations, clip-higher, GSPO's sequence ratio, KL as a loss, DAPO's overlong penalty,
multi-turn reward placement and cross-rank whitening statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from chatrl.algorithms.advantages import compute_advantages, rloo_advantages
from chatrl.algorithms.kl import kl_loss
from chatrl.algorithms.losses import aggregate, policy_loss
from chatrl.algorithms.masked import masked_whiten
from chatrl.algorithms.rewards import overlong_penalty, shape_rewards, turn_rewards

MASK3 = torch.ones(3, 2)


def test_rloo_by_hand():
    # one group of 3: scores 1, 0, 2 -> baselines (0+2)/2=1, (1+2)/2=1.5, (1+0)/2=0.5 -> A = 0, -1.5, 1.5
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 2.0]), 3, MASK3)
    assert_close(adv, torch.tensor([[0.0, 0.0], [-1.5, -1.5], [1.5, 1.5]]))
    with pytest.raises(ValueError, match=">= 2"):
        rloo_advantages(torch.tensor([1.0, 2.0]), 1, torch.ones(2, 1))


def rewards_for(scores: list[float], width: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores at the last token of full rows, no KL: what the trainer feeds the estimators."""
    mask = torch.ones(len(scores), width)
    return shape_rewards(torch.tensor(scores), torch.zeros(len(scores), width), mask, beta=0.0), mask


def test_dr_grpo_and_rloo_through_the_registry():
    rewards, mask = rewards_for([1.0, 0.0, 2.0, 5.0, 5.0, 5.0])  # two groups of 3; the second is tied
    dr, _ = compute_advantages("dr_grpo", rewards, None, mask, group_size=3)
    # group 1 mean 1 -> 0, -1, 1; group 2 tied -> 0
    assert_close(dr[:, 0], torch.tensor([0.0, -1.0, 1.0, 0.0, 0.0, 0.0]))
    rloo, _ = compute_advantages("rloo", rewards, None, mask, group_size=3)
    assert_close(rloo[:, 1], torch.tensor([0.0, -1.5, 1.5, 0.0, 0.0, 0.0]))  # = 3/2 * Dr. GRPO's


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_group_relative_advantages_are_never_whitened_again(kind):
    # a tied group has advantage exactly 0; whitening over tokens would shift it by the batch mean
    rewards, mask = rewards_for([1.0, 0.0, 0.0, 3.0, 3.0, 3.0])
    mask[1, 1] = 0  # unequal lengths make the token mean non-zero
    plain, _ = compute_advantages(kind, rewards, None, mask, group_size=3)
    asked, _ = compute_advantages(kind, rewards, None, mask, group_size=3, whiten=True)
    assert torch.equal(plain, asked)
    assert torch.equal(asked[3:], torch.zeros(3, 2))
    # the estimator that may be whitened is: gae's advantages change
    values = torch.zeros_like(rewards)
    gae, _ = compute_advantages("gae", rewards, values, mask, gamma=1.0, lam=1.0)
    gae_w, _ = compute_advantages("gae", rewards, values, mask, gamma=1.0, lam=1.0, whiten=True)
    assert_close(gae_w, masked_whiten(gae, mask))


def test_whitening_takes_the_given_moments():
    x, mask = torch.tensor([[1.0, 3.0]]), torch.ones(1, 2)
    out = masked_whiten(x, mask, moments=lambda x, m: (torch.tensor(0.0), torch.tensor(4.0)), eps=0.0)
    assert_close(out, torch.tensor([[0.5, 1.5]]))  # (x - 0) / 2


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
LMASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_aggregations_by_hand():
    # token_mean: (1+2+3+4)/4 = 2.5; seq_mean_token_mean: (2 + 4)/2 = 3; Dr. GRPO: 10 / (2 rows * L_max 5) = 1
    assert_close(aggregate(LOSS, LMASK, "token_mean"), torch.tensor(2.5))
    assert_close(aggregate(LOSS, LMASK, "seq_mean_token_mean"), torch.tensor(3.0))
    assert_close(aggregate(LOSS, LMASK, "seq_mean_token_sum_norm", max_len=5), torch.tensor(1.0))
    # a global token denominator (e.g. 8 tokens over 2 micro-batches -> 4 per micro-batch): 10 / 4
    assert_close(aggregate(LOSS, LMASK, "token_mean", denom=4.0), torch.tensor(2.5))
    assert_close(aggregate(LOSS, LMASK, "token_mean", denom=5.0), torch.tensor(2.0))
    # a row with no counted token is in no mean
    assert_close(aggregate(LOSS, torch.tensor([[1, 1, 1], [0, 0, 0]]), "seq_mean_token_mean"), torch.tensor(2.0))
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(LOSS, LMASK, "sum")


def test_clip_higher_by_hand():
    # ratios e^0.3 = 1.3499 (A=+1) and e^-0.3 = 0.7408 (A=-1); e_low 0.2, e_high 0.28
    logp, old = torch.tensor([[0.3, -0.3]]), torch.zeros(1, 2)
    adv, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, clip_eps_high=0.28)
    # token 0: max(-1.3499, -1.28) = -1.28 (clipped high); token 1: max(0.7408, 0.8) = 0.8 (clipped low)
    assert_close(loss, torch.tensor((-1.28 + 0.8) / 2))
    assert_close(stats["clipfrac_high"], torch.tensor(0.5))
    assert_close(stats["clipfrac_low"], torch.tensor(0.5))
    assert_close(stats["clipfrac"], torch.tensor(1.0))
    # symmetric clipping 0.2 gives -1.2 for token 0
    sym, _ = policy_loss(logp, old, adv, mask, 0.2)
    assert_close(sym, torch.tensor((-1.2 + 0.8) / 2))


def test_gspo_sequence_ratio_by_hand():
    # row log-ratios 0.1 and 0.3 -> sequence log-ratio 0.2 for both tokens; A = 1, no clipping at e = 0.5
    logp = torch.tensor([[0.1, 0.3]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.5, level="sequence")
    assert_close(loss, torch.tensor(-math.exp(0.2)))
    assert_close(stats["ratio_mean"], torch.tensor(math.exp(0.2)))
    loss.backward()
    # d/dlogp_t of -exp(mean) = -exp(0.2) * 1/2 for each token (the ratio is shared by the sequence)
    assert_close(logp.grad, torch.full((1, 2), -math.exp(0.2) / 2))
    # token level: -(e^0.1 + e^0.3)/2
    tok, _ = policy_loss(logp.detach(), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.5)
    assert_close(tok, torch.tensor(-(math.exp(0.1) + math.exp(0.3)) / 2))
    # a padded token changes nothing: its log-ratio is not in the mean
    padded = torch.tensor([[0.1, 0.3, 9.0]])
    loss3, _ = policy_loss(padded, torch.zeros(1, 3), torch.ones(1, 3), torch.tensor([[1.0, 1.0, 0.0]]), 0.5,
                           level="sequence")
    assert_close(loss3, torch.tensor(-math.exp(0.2)))


def test_kl_as_loss_by_hand():
    # k3 with d = logp - ref: x = -d; k3 = e^x - x - 1. tokens d = 0.5, -0.5 (masked 3rd)
    logp, ref = torch.tensor([[0.5, -0.5, 7.0]]), torch.zeros(1, 3)
    mask = torch.tensor([[1, 1, 0]])
    k = [math.exp(-0.5) + 0.5 - 1, math.exp(0.5) - 0.5 - 1]
    assert_close(kl_loss(logp, ref, mask, "k3"), torch.tensor(sum(k) / 2))
    dr = kl_loss(logp, ref, mask, "k3", agg=lambda x, m: aggregate(x, m, "seq_mean_token_sum_norm", max_len=4))
    assert_close(dr, torch.tensor(sum(k) / 4))


def test_overlong_penalty_by_hand():
    # max 10, buffer 4, factor 1: L <= 6 -> 0; 8 -> -(8-6)/4 = -0.5; 10 -> -1; 12 -> -1
    out = overlong_penalty(torch.tensor([3, 6, 8, 10, 12]), 10, 4, 1.0)
    assert_close(out, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    assert_close(overlong_penalty(torch.tensor([10, 11]), 10, 0, 2.0), torch.tensor([0.0, -2.0]))


def test_turn_rewards_land_on_turn_ends_discounted():
    # row 0: turns end at columns 1 and 4 with rewards 1 and 2, gamma 0.5 -> 1 at col 1, 2*0.5 = 1 at col 4
    # row 1: one turn ending at column 2 with reward 3; its second slot is not a turn
    values = torch.tensor([[1.0, 2.0], [3.0, 99.0]])
    positions = torch.tensor([[1, 4], [2, 0]])
    valid = torch.tensor([[True, True], [True, False]])
    out = turn_rewards(values, positions, valid, 6, gamma=0.5)
    assert_close(out, torch.tensor([[0.0, 1.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 3.0, 0.0, 0.0, 0.0]]))
