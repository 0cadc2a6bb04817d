"""GAE (vs hand numbers and a plain-python reference), GRPO and REINFORCE++ advantages."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from chatrl.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    gae_advantages,
    grpo_advantages,
    reinforce_returns,
)

REWARDS = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 9.0]])
VALUES = torch.tensor([[0.5, 1.0, 1.5], [2.0, 0.5, 7.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 1 ended after 2 tokens; col 2 is padding


def reference_gae(rewards, values, mask, gamma, lam):
    """Plain-python double loop: GAE on each row's real tokens (compacted), V = 0 after the last one."""
    B, R = len(rewards), len(rewards[0])
    adv = [[0.0] * R for _ in range(B)]
    ret = [[0.0] * R for _ in range(B)]
    for b in range(B):
        real = [t for t in range(R) if mask[b][t]]
        next_v, next_a = 0.0, 0.0
        for t in reversed(real):
            r, v = float(rewards[b][t]), float(values[b][t])
            delta = r + gamma * next_v - v
            next_a = delta + gamma * lam * next_a
            next_v = v
            adv[b][t], ret[b][t] = next_a, next_a + v
    return torch.tensor(adv), torch.tensor(ret)


def random_case(B, R, seed, holes=False):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, R, generator=g)
    values = torch.randn(B, R, generator=g)
    if holes:
        mask = (torch.rand(B, R, generator=g) > 0.4).long()
    else:  # right padded, lengths 0..R (an empty and a full row included)
        lengths = torch.randint(0, R + 1, (B,), generator=g)
        lengths[0], lengths[1] = 0, R
        mask = (torch.arange(R).expand(B, R) < lengths.unsqueeze(1)).long()
    return rewards, values, mask


def test_gae_by_hand():
    # gamma 0.9, lam 0.8 -> gamma*lam = 0.72
    # row 0: t2: delta = 2 + 0 - 1.5 = 0.5                  A2 = 0.5
    #        t1: delta = 0 + 0.9*1.5 - 1.0 = 0.35           A1 = 0.35 + 0.72*0.5 = 0.71
    #        t0: delta = 1 + 0.9*1.0 - 0.5 = 1.4            A0 = 1.4 + 0.72*0.71 = 1.9112
    # row 1 (V after its last real token t1 is 0; reward 9 and value 7 at padding are ignored):
    #        t1: delta = 1 + 0 - 0.5 = 0.5                  A1 = 0.5
    #        t0: delta = 0.5 + 0.9*0.5 - 2.0 = -1.05        A0 = -1.05 + 0.72*0.5 = -0.69
    adv, ret = gae_advantages(REWARDS, VALUES, MASK, gamma=0.9, lam=0.8)
    assert_close(adv, torch.tensor([[1.9112, 0.71, 0.5], [-0.69, 0.5, 0.0]]))
    # returns = A + V: 1.9112+0.5, 0.71+1.0, 0.5+1.5 | -0.69+2.0, 0.5+0.5, 0 (padding)
    assert_close(ret, torch.tensor([[2.4112, 1.71, 2.0], [1.31, 1.0, 0.0]]))


def test_gae_lambda_one_gamma_one_is_return_minus_value():
    # lam = gamma = 1: A_t = sum_{k>=t} r_k - V_t (Monte Carlo); row 0: [3-0.5, 2-1, 2-1.5]
    adv, _ = gae_advantages(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
    assert_close(adv[0], torch.tensor([2.5, 1.0, 0.5]))


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_gae_matches_python_reference(seed, holes):
    rewards, values, mask = random_case(6, 9, seed, holes)
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.95, lam=0.9)
    ref_adv, ref_ret = reference_gae(rewards.tolist(), values.tolist(), mask.tolist(), 0.95, 0.9)
    assert_close(adv, ref_adv)
    assert_close(ret, ref_ret)


def test_gae_padding_never_leaks():
    rewards, values, mask = random_case(6, 9, seed=7)
    noise = torch.randn(6, 9) * 1e3
    pad = ~mask.bool()
    adv, ret = gae_advantages(rewards, values, mask, 0.99, 0.95)
    adv2, ret2 = gae_advantages(torch.where(pad, noise, rewards), torch.where(pad, -noise, values), mask, 0.99, 0.95)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)
    assert torch.equal(adv[pad], torch.zeros(int(pad.sum())))


def test_grpo_by_hand():
    # group 0 [1, 0, 2]: mean 1, centred [0, -1, 1], var (0+1+1)/2 = 1 -> A = [0, -1, 1]
    # group 1 [3, 5, 10]: mean 6, centred [-3, -1, 4], var (9+1+16)/2 = 13 -> A = centred / sqrt(13)
    scores = torch.tensor([1.0, 0.0, 2.0, 3.0, 5.0, 10.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0], [1, 1], [0, 0]])
    adv = grpo_advantages(scores, group_size=3, mask=mask, eps=0.0)
    s13 = math.sqrt(13)
    per_seq = torch.tensor([0.0, -1.0, 1.0, -3 / s13, -1 / s13, 4 / s13])
    assert_close(adv, per_seq.unsqueeze(1) * mask)
    # Dr. GRPO: no std division -> the centred scores
    dr = grpo_advantages(scores, 3, mask, scale_by_std=False)
    assert_close(dr[:, 0], torch.tensor([0.0, -1.0, 1.0, -3.0, -1.0, 0.0]))  # last row is all padding


def test_grpo_constant_group_and_bad_size():
    adv = grpo_advantages(torch.tensor([4.0, 4.0, 1.0, 2.0]), 2, torch.ones(4, 3))
    assert torch.equal(adv[:2], torch.zeros(2, 3))  # no spread -> no signal (and no NaN)
    # group [1, 2]: centred [-0.5, 0.5], var 0.5/1 -> std 0.7071 -> A = -+0.7071
    assert_close(adv[2:, 0], torch.tensor([-0.5, 0.5]) / math.sqrt(0.5), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(torch.zeros(4), 3, torch.ones(4, 2))


def test_reinforce_returns_by_hand():
    # gamma 0.9, row 0: G2 = 2, G1 = 0 + 0.9*2 = 1.8, G0 = 1 + 0.9*1.8 = 2.62
    #            row 1: G1 = 1, G0 = 0.5 + 0.9*1 = 1.4, padding 0 (its reward 9 ignored)
    out = reinforce_returns(REWARDS, MASK, gamma=0.9)
    assert_close(out, torch.tensor([[2.62, 1.8, 2.0], [1.4, 1.0, 0.0]]))


def test_registry_dispatch():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"}
    # gae: the numbers of test_gae_by_hand
    adv, ret = compute_advantages("gae", REWARDS, VALUES, MASK, gamma=0.9, lam=0.8)
    assert_close(adv, torch.tensor([[1.9112, 0.71, 0.5], [-0.69, 0.5, 0.0]]))
    assert_close(ret, torch.tensor([[2.4112, 1.71, 2.0], [1.31, 1.0, 0.0]]))
    # reinforce_pp: returns of test_reinforce_returns_by_hand, [2.62, 1.8, 2.0 | 1.4, 1.0], whitened over the 5
    # real tokens: mean 8.82 / 5 = 1.764, centred [0.856, 0.036, 0.236 | -0.364, -0.764],
    # unbiased var (0.732736 + 0.001296 + 0.055696 + 0.132496 + 0.583696) / 4 = 1.50592 / 4 = 0.37648
    adv, ret = compute_advantages("reinforce_pp", REWARDS, None, MASK, gamma=0.9)
    assert_close(ret, torch.tensor([[2.62, 1.8, 2.0], [1.4, 1.0, 0.0]]))
    assert_close(adv, torch.tensor([[0.856, 0.036, 0.236], [-0.364, -0.764, 0.0]]) / math.sqrt(0.37648))
    # group-relative scores = per-row sums [3, 1.5] (group of 2): dr_grpo centred [0.75, -0.75];
    # rloo s_i - s_other = [1.5, -1.5]
    adv, _ = compute_advantages("dr_grpo", REWARDS, None, MASK, group_size=2)
    assert_close(adv, torch.tensor([[0.75, 0.75, 0.75], [-0.75, -0.75, 0.0]]))
    adv, _ = compute_advantages("rloo", REWARDS, None, MASK, group_size=2)
    assert_close(adv, torch.tensor([[1.5, 1.5, 1.5], [-1.5, -1.5, 0.0]]))
    # grpo scores = per-row sum of real-token rewards: [1+0+2, 0.5+1] = [3, 1.5] -> centred [0.75, -0.75],
    # var 2*0.5625/1 = 1.125 -> A = +-0.75/sqrt(1.125) = +-0.7071
    adv, _ = compute_advantages("grpo", REWARDS, None, MASK, group_size=2)
    assert_close(adv, torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]]) * 0.75 / math.sqrt(1.125))
    with pytest.raises(ValueError, match="needs critic"):
        compute_advantages("gae", REWARDS, None, MASK)
    with pytest.raises(ValueError, match="choose one of: dr_grpo, gae, grpo, reinforce_pp, rloo"):
        compute_advantages("vtrace", REWARDS, VALUES, MASK)
