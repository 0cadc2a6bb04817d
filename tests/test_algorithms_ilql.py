"""ILQL losses (`chatrl.algorithms.ilql`) against numbers worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from chatrl.algorithms.ilql import (
    awac_loss,
    bellman_targets,
    cql_loss,
    expectile_loss,
    gather_actions,
    guided_logits,
    ilql_loss,
    next_action_values,
    polyak_update,
    q_bellman_loss,
)
from chatrl.models.ilql_heads import ILQLHeads


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_expectile_loss_by_hand_and_gradient_only_into_v() -> None:
    # tau = 0.7; Qhat = [3, 0, 99], V = [1, 1, 5], mask = [1, 1, 0] (the 99 must not count)
    # u = Qhat - V = [2, -1]; weights: u >= 0 -> tau = 0.7, u < 0 -> 1 - tau = 0.3
    # L = (0.7 * 2^2 + 0.3 * (-1)^2) / 2 = (2.8 + 0.3) / 2 = 1.55
    # dL/dV_0 = -(2 * 0.7 * 2) / 2 = -1.4 ; dL/dV_1 = -(2 * 0.3 * -1) / 2 = 0.3 ; dL/dV_2 = 0 (masked)
    q = t([3.0, 0.0, 99.0]).requires_grad_(True)
    v = t([1.0, 1.0, 5.0]).requires_grad_(True)
    mask = t([1, 1, 0])
    loss = expectile_loss(q, v, mask, tau=0.7)
    assert loss.item() == pytest.approx(1.55)
    loss.backward()
    assert v.grad[0].tolist() == pytest.approx([-1.4, 0.3, 0.0])
    assert q.grad is None  # Qhat is a fixed target


def test_expectile_at_tau_half_is_half_the_squared_error() -> None:
    # tau = 0.5 weighs both signs 0.5: u = [2, -1] -> 0.5 * (4 + 1) / 2 = 1.25
    assert expectile_loss(t([3.0, 0.0]), t([1.0, 1.0]), t([1, 1]), tau=0.5).item() == pytest.approx(1.25)


def test_next_action_values_single_reply_and_multi_turn() -> None:
    # row 0: position 0 is the prompt, actions at 1, 2, 3, position 4 is padding
    #   V = [9, 0.5, 0.25, 2, 7] -> next V: t=1 -> V_2 = 0.25, t=2 -> V_3 = 2, t=3 -> 0 (last token: terminal)
    # row 1: actions at 0 and 3 (positions 1, 2 are the environment's reply), V = [1, 5, 6, 3, 8]
    #   t=0 -> V_3 = 3 (the environment's tokens are skipped), t=3 -> 0
    v = t([9.0, 0.5, 0.25, 2.0, 7.0], [1.0, 5.0, 6.0, 3.0, 8.0])
    mask = t([0, 1, 1, 1, 0], [1, 0, 0, 1, 0])
    assert next_action_values(v, mask).tolist() == [[0.0, 0.25, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0]]


def test_bellman_targets_and_q_loss_by_hand() -> None:
    # gamma = 0.5, the row of the test above, reward 1 at the last action (t=3):
    # y_1 = 0 + 0.5 * 0.25 = 0.125 ; y_2 = 0 + 0.5 * 2 = 1.0 ; y_3 = 1 + 0.5 * 0 = 1.0
    v = t([9.0, 0.5, 0.25, 2.0, 7.0]).requires_grad_(True)
    r = t([0.0, 0.0, 0.0, 1.0, 0.0])
    mask = t([0, 1, 1, 1, 0])
    y = bellman_targets(r, v, mask, gamma=0.5)
    assert y.tolist() == [[0.0, 0.125, 1.0, 1.0, 0.0]]
    assert not y.requires_grad  # V(s') is a target, not trained through Q's loss
    # two heads at the actions: Q1 = [., 0.125, 2, 0, .] -> errors 0, 1, -1 -> mean 2/3
    #                           Q2 = [., 1.125, 1, 1, .] -> errors 1, 0, 0  -> mean 1/3 ; sum = 1
    q1, q2 = t([5.0, 0.125, 2.0, 0.0, 5.0]), t([5.0, 1.125, 1.0, 1.0, 5.0])
    assert q_bellman_loss([q1, q2], y, mask).item() == pytest.approx(1.0)


def test_gamma_one_sums_the_reward_back_to_the_first_token() -> None:
    # gamma = 1 and V equal to its own Bellman target (V_t = 2 for every action, reward 2 at the end) is a fixed
    # point: every target is 2, so Q = 2 has zero loss
    v, mask = t([2.0, 2.0, 2.0]), t([1, 1, 1])
    y = bellman_targets(t([0.0, 0.0, 2.0]), v, mask, gamma=1.0)
    assert y.tolist() == [[2.0, 2.0, 2.0]]


def test_cql_by_hand() -> None:
    # position 0: Q = [2, 0], action 0: logsumexp = ln(e^2 + 1) ; term = ln(e^2 + 1) - 2 = ln(1 + e^-2)
    # position 1: Q = [0, ln 3], action 1: logsumexp = ln(1 + 3) = ln 4 ; term = ln 4 - ln 3 = ln(4/3)
    # position 2: masked (a -100 action there must not matter)
    q = torch.tensor([[[2.0, 0.0], [0.0, math.log(3.0)], [7.0, -7.0]]])
    actions = torch.tensor([[0, 1, -100]])
    mask = t([1, 1, 0])
    want = (math.log(1 + math.exp(-2)) + math.log(4 / 3)) / 2
    assert cql_loss([q], actions, mask).item() == pytest.approx(want, rel=1e-6)
    assert cql_loss([q, q], actions, mask).item() == pytest.approx(2 * want, rel=1e-6)  # summed over heads


def test_awac_is_the_lm_nll_of_the_data_tokens() -> None:
    # logits [0, 0, 0, 0] -> p = 1/4 for any token: -log p = ln 4 at both counted positions
    logits = torch.zeros(1, 3, 4)
    assert awac_loss(logits, torch.tensor([[3, 0, 2]]), t([1, 1, 0])).item() == pytest.approx(math.log(4))


def test_ilql_loss_adds_the_terms_with_their_weights() -> None:
    # one row, 2 positions, vocab 2, both positions actions, gamma = 1, tau = 0.5
    # Q1 = Q2 = [[1, 0], [0, 1]], actions [0, 1] -> Q(s,a) = [1, 1]
    # V = [0.5, 0.5], reward 1 at t=1 -> y = [0 + V_1, 1 + 0] = [0.5, 1] -> errors [0.5, 0] -> mean 0.125 per head
    #   L_Q = 2 * 0.125 = 0.25
    # Qhat = [1, 1] -> u = [0.5, 0.5] -> L_V = 0.5 * 0.25 = 0.125
    # CQL per head: ln(e + 1) - 1 at each position -> sum over 2 heads = 2 ln(1 + e^-1)
    # LM logits all 0 -> L_LM = ln 2 ; weights cql_alpha = 0.5, awac = 2
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    loss, stats = ilql_loss(torch.zeros(1, 2, 2), [q, q.clone()], t([1.0, 1.0]), t([0.5, 0.5]),
                            torch.tensor([[0, 1]]), t([0.0, 1.0]), t([1, 1]),
                            gamma=1.0, tau=0.5, cql_alpha=0.5, awac_weight=2.0)
    cql = 2 * math.log(1 + math.exp(-1))
    assert stats["loss_q"].item() == pytest.approx(0.25)
    assert stats["loss_v"].item() == pytest.approx(0.125)
    assert stats["loss_cql"].item() == pytest.approx(cql, rel=1e-6)
    assert stats["loss_awac"].item() == pytest.approx(math.log(2))
    assert loss.item() == pytest.approx(0.25 + 0.125 + 0.5 * cql + 2 * math.log(2), rel=1e-6)


def test_gather_actions_ignores_masked_garbage() -> None:
    q = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert gather_actions(q, torch.tensor([[1, -100]]), t([1, 0])).tolist() == [[2.0, 0.0]]


def test_polyak_update_by_hand() -> None:
    # alpha = 0.25: 1 * 0.75 + 3 * 0.25 = 1.5 ; alpha = 1 copies ; the online tensor is untouched
    target, online = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 2.0])
    polyak_update([target], [online], 0.25)
    assert target.tolist() == [1.5, -1.0] and online.tolist() == [3.0, 2.0]
    polyak_update([target], [online], 1.0)
    assert target.tolist() == [3.0, 2.0]


def test_guided_logits_by_hand() -> None:
    # z = [1, 2], Q = [3, 0], V = 1, beta = 0.5: z + 0.5 * ([3, 0] - 1) = [1 + 1, 2 - 0.5] = [2, 1.5]
    z, q, v = t([1.0, 2.0]), t([3.0, 0.0]), torch.tensor([1.0])
    assert guided_logits(z, q, v, 0.5).tolist() == [[2.0, 1.5]]
    assert guided_logits(z, q, v, 0.0) is z  # beta 0 is the plain LM


def _heads_with_different_targets() -> ILQLHeads:
    """hidden 2 -> vocab 3. Target heads: Q1 = [h0, h1, h0 + h1], Q2 = [h1 + 0.5, h0, -h0]; both online heads give
    10 everywhere (so reading the online heads, or the max of the targets, shows in every number)."""
    heads = ILQLHeads(2, 3, two_q=True)
    with torch.no_grad():
        for online in heads.online_q():
            online.weight.zero_()
            online.bias.fill_(10.0)
        heads.q1_target.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        heads.q1_target.bias.zero_()
        heads.q2_target.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]))
        heads.q2_target.bias.copy_(torch.tensor([0.5, 0.0, 0.0]))
    return heads


def test_ilql_heads_use_the_min_of_two_different_target_heads() -> None:
    # h0 = [1, 2]: Q1 = [1, 2, 3], Q2 = [2.5, 1, -1] -> min [1, 1, -1]   (max [2.5, 2, 3])
    # h1 = [2, -1]: Q1 = [2, -1, 1], Q2 = [-0.5, 2, -2] -> min [-0.5, -1, -2]   (max [2, 2, 1])
    heads = _heads_with_different_targets()
    hidden = torch.tensor([[[1.0, 2.0], [2.0, -1.0]]])
    q, v = heads.guidance(hidden)
    assert q.tolist() == [[[1.0, 1.0, -1.0], [-0.5, -1.0, -2.0]]]
    assert v.shape == (1, 2)
    # training forward: the target at the taken actions [2, 0]: min(3, -1) = -1, min(2, -0.5) = -0.5
    out = heads(hidden, torch.tensor([[2, 0]]))
    assert out.target_q.tolist() == [[-1.0, -0.5]]
    assert [x.tolist() for x in out.q] == [[[[10.0] * 3] * 2]] * 2  # the online heads are what is trained
    # one Q head: its target alone (Q1 at the actions: 3, 2)
    single = ILQLHeads(2, 3, two_q=False)
    with torch.no_grad():
        single.q1_target.load_state_dict(heads.q1_target.state_dict())
    assert single(hidden, torch.tensor([[2, 0]])).target_q.tolist() == [[3.0, 2.0]]
