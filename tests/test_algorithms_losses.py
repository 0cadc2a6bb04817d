"""PPO / critic / entropy / reward-model / SFT losses against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from chatrl.algorithms.losses import (
    entropy_from_logits,
    mean_entropy,
    pairwise_reward_loss,
    policy_loss,
    token_logprobs,
    value_loss,
)

MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
LN3 = math.log(3.0)


def pad_with(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(MASK.bool(), x, torch.full_like(x, value))


# ---- PPO policy loss ---------------------------------------------------------------------------
LOGP = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]])
OLD = torch.tensor([[-1.0, -1.0, -1.0], [-0.5, -1.0, 0.0]])
ADV = torch.tensor([[1.0, 2.0, -1.0], [-0.5, 1.0, 0.0]])
# log r = [[0, 0.5, -1], [0.2, -0.2]];  r = [[1, 1.6487213, 0.3678794], [1.2214028, 0.8187308]]
# clip(r, 0.8, 1.2) = [[1, 1.2, 0.8], [1.2, 0.8187308]]
# per token max(-A r, -A clip(r)):
#   (0,0) A=1:    -1,          -1          -> -1
#   (0,1) A=2:    -3.2974425,  -2.4        -> -2.4        (clipped term larger: counts as clipped)
#   (0,2) A=-1:    0.3678794,   0.8        ->  0.8        (clipped)
#   (1,0) A=-0.5:  0.6107014,   0.6        ->  0.6107014
#   (1,1) A=1:    -0.8187308,  -0.8187308  -> -0.8187308  (equal: not clipped)
# loss = (-1 - 2.4 + 0.8 + 0.6107014 - 0.8187308) / 5 = -2.8080294 / 5 = -0.56160588


def test_policy_loss_by_hand():
    loss, stats = policy_loss(LOGP, OLD, ADV, MASK, clip_eps=0.2)
    assert_close(loss, torch.tensor(-0.56160588))
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    # approx_kl: 0.5 * [0, 0.25, 1, 0.04, 0.04] = [0, 0.125, 0.5, 0.02, 0.02] -> 0.665 / 5 = 0.133
    assert stats["approx_kl"].item() == pytest.approx(0.133)
    # ratio mean: (1 + 1.6487213 + 0.3678794 + 1.2214028 + 0.8187308) / 5 = 1.01134686
    assert stats["ratio_mean"].item() == pytest.approx(1.01134686)
    assert not any(v.requires_grad for v in stats.values())


def test_policy_loss_gradient_is_clipped():
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, OLD, ADV, MASK, clip_eps=0.2)
    loss.backward()
    # d/dlogp of -A r / 5 is -A r / 5 where unclipped; 0 on clipped tokens and padding
    # (0,0): -1*1/5 = -0.2; (1,0): 0.5*1.2214028/5 = 0.12214028; (1,1): -0.8187308/5 = -0.16374616
    expected = torch.tensor([[-0.2, 0.0, 0.0], [0.12214028, -0.16374616, 0.0]])
    assert_close(logp.grad, expected)


def test_policy_loss_ignores_padding_values_and_gradients():
    base = policy_loss(LOGP, OLD, ADV, MASK, 0.2)
    logp = pad_with(LOGP, 80.0).requires_grad_(True)  # exp(80 - old) would overflow fp32 if not zeroed
    loss, stats = policy_loss(logp, pad_with(OLD, -60.0), pad_with(ADV, 1e6), MASK, 0.2)
    assert torch.equal(loss, base[0])
    assert all(torch.equal(stats[k], base[1][k]) for k in stats)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[1, 2] == 0


# ---- clipped value loss ------------------------------------------------------------------------
V = torch.tensor([[1.0, 2.0, 0.0], [0.5, 3.0, 0.0]])
V_OLD = torch.tensor([[0.0, 1.0, 0.5], [0.5, 2.0, 0.0]])
RET = torch.tensor([[1.0, 1.5, 1.0], [2.0, 3.2, 0.0]])
# clip_eps 0.2: v_clip = old + clip(v - old, -0.2, 0.2) = [[0.2, 1.2, 0.3], [0.5, 2.2]]
#   (0,0): (1-1)^2 = 0,        (0.2-1)^2 = 0.64  -> 0.64  (clipped larger)
#   (0,1): (2-1.5)^2 = 0.25,   (1.2-1.5)^2 = 0.09 -> 0.25
#   (0,2): (0-1)^2 = 1,        (0.3-1)^2 = 0.49  -> 1
#   (1,0): (0.5-2)^2 = 2.25,   same              -> 2.25
#   (1,1): (3-3.2)^2 = 0.04,   (2.2-3.2)^2 = 1   -> 1     (clipped larger)
# loss = 0.5 * (0.64 + 0.25 + 1 + 2.25 + 1) / 5 = 0.5 * 5.14 / 5 = 0.514


def test_value_loss_by_hand():
    loss, stats = value_loss(V, V_OLD, RET, MASK, clip_eps=0.2)
    assert_close(loss, torch.tensor(0.514))
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    assert stats["values_mean"].item() == pytest.approx(6.5 / 5)  # (1 + 2 + 0 + 0.5 + 3) / 5
    # no clipping: 0.5 * (0 + 0.25 + 1 + 2.25 + 0.04) / 5 = 0.354
    loss, stats = value_loss(V, V_OLD, RET, MASK, clip_eps=None)
    assert_close(loss, torch.tensor(0.354))
    assert stats["clipfrac"].item() == 0.0


def test_value_loss_ignores_padding():
    v = pad_with(V, 1e3).requires_grad_(True)
    loss, stats = value_loss(v, pad_with(V_OLD, -1e3), pad_with(RET, 5e2), MASK, 0.2)
    assert torch.equal(loss, value_loss(V, V_OLD, RET, MASK, 0.2)[0])
    loss.backward()
    assert v.grad[1, 2] == 0
    # (0,1) unclipped branch: d/dv 0.5*(v-R)^2/5 = (2-1.5)/5 = 0.1; (0,0) clipped branch wins -> v_clip is
    # constant in v there (v - old = 1 > 0.2) -> 0
    assert v.grad[0, 1].item() == pytest.approx(0.1) and v.grad[0, 0] == 0


# ---- entropy -----------------------------------------------------------------------------------
def test_entropy_by_hand():
    # [0, 0] -> p = [.5, .5] -> ln 2 = 0.6931472;  [0, ln 3] -> p = [.25, .75] ->
    # -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.3465736 + 0.2157616 = 0.5623351; [5, 5] -> ln 2; [100, 0] -> ~0
    logits = torch.tensor([[[0.0, 0.0], [0.0, LN3]], [[5.0, 5.0], [100.0, 0.0]]])
    ent = entropy_from_logits(logits)
    assert_close(ent, torch.tensor([[0.6931472, 0.5623351], [0.6931472, 0.0]]))
    # masked mean over 3 counted positions: (0.6931472 + 0.5623351 + 0.6931472) / 3 = 0.6495432
    mask = torch.tensor([[1, 1], [1, 0]])
    assert_close(mean_entropy(logits, mask), torch.tensor(0.6495432))
    noisy = logits.clone()
    noisy[1, 1] = torch.tensor([-3.0, 7.0])
    assert torch.equal(mean_entropy(noisy, mask), mean_entropy(logits, mask))


def test_entropy_matches_definition_in_bf16():
    logits = torch.randn(2, 5, 11) * 4
    p = logits.softmax(-1)
    assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    out = entropy_from_logits(logits.bfloat16())
    assert out.dtype == torch.float32
    assert_close(out, entropy_from_logits(logits.bfloat16().float()))


# ---- reward model loss -------------------------------------------------------------------------
def test_pairwise_loss_single_pair():
    # r_c = 1, r_r = 0: -log sigmoid(1) = log(1 + e^-1) = 0.3132617
    loss, stats = pairwise_reward_loss(torch.tensor([1.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(0.3132617)
    assert stats["accuracy"].item() == 1.0


def test_pairwise_loss_by_hand():
    rc, rr = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.5, 2.0])
    # diffs [1, -0.5, 0]: log(1+e^-1) = 0.3132617, log(1+e^0.5) = 0.9740770, ln 2 = 0.6931472
    # mean = 1.9804859 / 3 = 0.6601620
    loss, stats = pairwise_reward_loss(rc, rr)
    assert loss.item() == pytest.approx(0.6601620)
    assert stats["accuracy"].item() == pytest.approx(1 / 3)  # the tie (2 vs 2) counts as wrong
    assert stats["chosen"].item() == pytest.approx(1.0)
    assert stats["rejected"].item() == pytest.approx(2.5 / 3)
    assert stats["margin"].item() == pytest.approx(0.5 / 3)
    # margin [1, 0, 0]: diffs - margin = [0, -0.5, 0] -> (0.6931472 + 0.9740770 + 0.6931472) / 3 = 0.7867905
    loss, _ = pairwise_reward_loss(rc, rr, margin=torch.tensor([1.0, 0.0, 0.0]))
    assert loss.item() == pytest.approx(0.7867905)
    # centring: (r_c + r_r)^2 = [1, 0.25, 16] -> mean 5.75; 0.6601620 + 0.01 * 5.75 = 0.7176620
    loss, _ = pairwise_reward_loss(rc, rr, center_coef=0.01)
    assert loss.item() == pytest.approx(0.7176620)


# ---- token log-probs --------------------------------------------------------------
def test_token_logprobs_by_hand_and_vs_log_softmax():
    # [0, 0] token 1 -> ln 0.5; [0, ln 3] token 1 -> ln 0.75 = -0.2876821; [2, 2] token 0 -> ln 0.5
    logits = torch.tensor([[[0.0, 0.0], [0.0, LN3], [2.0, 2.0]]])
    out = token_logprobs(logits, torch.tensor([[1, 1, 0]]))
    assert_close(out, torch.tensor([[-0.6931472, -0.2876821, -0.6931472]]))
    big = (torch.randn(2, 7, 50) * 5).requires_grad_(True)
    tokens = torch.randint(0, 50, (2, 7))
    got = token_logprobs(big, tokens)
    ref = big.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert_close(got, ref)
    got.sum().backward()  # differentiable (the actor's new log-probs)
    assert big.grad is not None and torch.isfinite(big.grad).all()
    bf = token_logprobs(big.detach().bfloat16(), tokens)
    assert bf.dtype == torch.float32
    assert_close(bf, big.detach().bfloat16().float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
