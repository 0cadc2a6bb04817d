"""The registered policy losses (`algorithms.policy_losses`): CISPO and SAPO against hand-computed values and
gradients, next to PPO-clip where the ratio leaves the clip band, and the config / update seam that picks one."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from chatrl.algorithms.losses import policy_loss
from chatrl.algorithms.policy_losses import POLICY_LOSSES, cispo_loss, sapo_loss
from chatrl.config_rl import GRPOConfig, PPOConfig
from chatrl.configbase import load_config
from chatrl.errors import ChatrlError
from rl_update_harness import experience, grpo, run, weighted_experience

MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
LOGP = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]])
OLD = torch.tensor([[-1.0, -1.0, -1.0], [-0.5, -1.0, 0.0]])
ADV = torch.tensor([[1.0, 2.0, -1.0], [-0.5, 1.0, 0.0]])
# log r = [[0, 0.5, -1], [0.2, -0.2]];  r = [[1, 1.6487213, 0.3678794], [1.2214028, 0.8187308]]
TIGHT = {"rtol": 1e-6, "atol": 1e-7}  # the hand numbers have 7-8 digits (assert_close's fp32 default atol is 1e-5)


def test_registry_names_and_config_choices():
    assert set(POLICY_LOSSES) == {"ppo_clip", "cispo", "sapo"} and POLICY_LOSSES["ppo_clip"] is policy_loss
    assert GRPOConfig().grpo.policy_loss == "ppo_clip" and PPOConfig().ppo.policy_loss == "ppo_clip"
    cfg = load_config(GRPOConfig, None, ["env.name=arithmetic", "grpo.policy_loss=sapo", "grpo.sapo_tau_neg=2"])
    assert (cfg.grpo.policy_loss, cfg.grpo.sapo_tau_pos, cfg.grpo.sapo_tau_neg) == ("sapo", 1.0, 2.0)
    with pytest.raises(ChatrlError, match="grpo.policy_loss"):
        load_config(GRPOConfig, None, ["env.name=arithmetic", "grpo.policy_loss=reinforce"])
    with pytest.raises(ChatrlError, match="sapo_tau_pos"):
        load_config(GRPOConfig, None, ["env.name=arithmetic", "grpo.sapo_tau_pos=0"])


# ---- CISPO ---------------------------------------------------------------------------------------
# e_low 0.2, e_high 0.28: weight clip(r, 0.8, 1.28) = [[1, 1.28, 0.8], [1.2214028, 0.8187308]] (detached)
# per token -w A logp:
#   (0,0): -1 * 1 * -1             =  1
#   (0,1): -1.28 * 2 * -0.5        =  1.28        (r = 1.65 > 1.28: clipped weight)
#   (0,2): -0.8 * -1 * -2          = -1.6         (r = 0.37 < 0.8: clipped weight)
#   (1,0): -1.2214028 * -0.5 * -0.3 = -0.18321042
#   (1,1): -0.8187308 * 1 * -1.2   =  0.98247696
# loss = 1.47926654 / 5 = 0.29585331; d/dlogp = -w A / 5 on every counted token:
#   [[-0.2, -0.512, 0.16], [0.12214028, -0.16374616, 0]]


def test_cispo_by_hand():
    logp = LOGP.clone().requires_grad_(True)
    loss, stats = cispo_loss(logp, OLD, ADV, MASK, 0.2, clip_eps_high=0.28)
    assert_close(loss, torch.tensor(0.29585331), **TIGHT)
    loss.backward()
    assert_close(logp.grad, torch.tensor([[-0.2, -0.512, 0.16], [0.12214028, -0.16374616, 0.0]]), **TIGHT)
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    assert stats["clipfrac_low"].item() == pytest.approx(1 / 5)
    assert stats["clipfrac_high"].item() == pytest.approx(1 / 5)
    assert stats["approx_kl"].item() == pytest.approx(0.133) and stats["ratio_mean"].item() == pytest.approx(1.01134686)
    assert not any(v.requires_grad for v in stats.values())


def test_cispo_keeps_the_gradient_where_ppo_clip_drops_it():
    """(0,1) has r = 1.65 > 1 + e with A > 0 and (0,2) r = 0.37 < 1 - e with A < 0: PPO-clip's gradient there is 0,
    CISPO's is -clip(r) A / 5 (the weight is clipped, the token stays)."""
    grads = {}
    for name in ("ppo_clip", "cispo"):
        logp = LOGP.clone().requires_grad_(True)
        POLICY_LOSSES[name](logp, OLD, ADV, MASK, 0.2)[0].backward()
        grads[name] = logp.grad
    assert grads["ppo_clip"][0, 1] == 0 and grads["ppo_clip"][0, 2] == 0
    assert_close(grads["cispo"][0, 1:], torch.tensor([-1.2 * 2 / 5, 0.8 * 1 / 5]), **TIGHT)
    # inside the band both are -r A / 5: (1,0) r = 1.2214028 (e = 0.2 -> clip 1.2 for CISPO's weight), (1,1) equal
    assert_close(grads["cispo"][1, 1], grads["ppo_clip"][1, 1])


def test_cispo_on_policy_gradient_is_the_policy_gradient_and_padding_is_ignored():
    logp = LOGP.clone().requires_grad_(True)
    cispo_loss(logp, LOGP, ADV, MASK, 0.2)[0].backward()  # r = 1: weight 1, gradient -A / 5
    assert_close(logp.grad, -ADV * MASK / 5)
    garbage = torch.where(MASK.bool(), LOGP, torch.tensor(80.0)).requires_grad_(True)
    loss, stats = cispo_loss(garbage, torch.where(MASK.bool(), OLD, torch.tensor(-60.0)),
                             torch.where(MASK.bool(), ADV, torch.tensor(1e6)), MASK, 0.2, clip_eps_high=0.28)
    assert_close(loss, torch.tensor(0.29585331), **TIGHT)
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    loss.backward()
    assert garbage.grad[1, 2] == 0


# ---- SAPO ----------------------------------------------------------------------------------------
# one row, 4 counted tokens + a pad; log r = [0, ln 2, -ln 2, ln 3] -> r = [1, 2, 0.5, 3]; A = [1, 2, -1, 0.5]
# tau = [1, 1, 1.05, 1] (tau_neg = 1.05 where A <= 0); s = sigmoid(tau (r - 1)):
#   s = [0.5, sigmoid(1) = 0.7310586, sigmoid(-0.525) = 0.3716838, sigmoid(2) = 0.8807971]
# per token -(4 / tau) s A = [-2, -5.8484686, +1.4159383, -1.7615942]           -> loss = -8.1941245 / 4
# gate 4 s (1 - s) = [1, 0.7864477, 0.9341398, 0.4199743]   (the last < 0.5: gatefrac 1/4)
# d/dlogp = -A * gate * r / 4 = [-0.25, -0.7864477, +0.1167675, -0.1574904]
SAPO_OLD = torch.tensor([[-1.0, -1.0, -1.0, -1.0, 0.0]])
SAPO_LOGP = SAPO_OLD + torch.tensor([[0.0, math.log(2), -math.log(2), math.log(3), 9.0]])
SAPO_ADV = torch.tensor([[1.0, 2.0, -1.0, 0.5, 1e6]])
SAPO_MASK = torch.tensor([[1, 1, 1, 1, 0]])


def test_sapo_token_level_by_hand():
    logp = SAPO_LOGP.clone().requires_grad_(True)
    loss, stats = sapo_loss(logp, SAPO_OLD, SAPO_ADV, SAPO_MASK)  # the paper's tau_pos 1, tau_neg 1.05
    assert_close(loss, torch.tensor(-8.1941245 / 4), **TIGHT)
    loss.backward()
    assert_close(logp.grad, torch.tensor([[-0.25, -0.7864477, 0.1167675, -0.1574904, 0.0]]), **TIGHT)
    assert stats["gate_mean"].item() == pytest.approx((1 + 0.7864477 + 0.9341398 + 0.4199743) / 4)
    assert stats["gatefrac"].item() == pytest.approx(1 / 4)
    assert stats["ratio_mean"].item() == pytest.approx(6.5 / 4)
    # the temperature follows the advantage's sign: tau_neg changes only the A < 0 token's term (1.4159383 above);
    # with tau 1 it is 4 sigmoid(-0.5) = 1.5101628
    same, _ = sapo_loss(SAPO_LOGP, SAPO_OLD, SAPO_ADV, SAPO_MASK, tau_pos=1.0, tau_neg=1.0)
    assert_close(same, torch.tensor((-8.1941245 - 1.4159383 + 1.5101628) / 4), **TIGHT)


def test_sapo_sequence_ratio_keeps_a_gradient_where_gspo_clip_drops_it():
    """GSPO's sequence ratio: log-ratios [0.5, -0.1] -> s = exp(0.2) = 1.2214028 for both tokens, A = 1, tau 1.
    sigmoid(0.2214028) = 0.5551257: loss = -4 * 0.5551257 = -2.2205028; each token's gradient is
    -A 4 q (1 - q) s / 2 = -0.6032781 (the mean over 2 tokens). PPO-clip at e = 0.2 clips s > 1.2: gradient 0."""
    old, adv, mask = torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2)
    logp = torch.tensor([[0.5, -0.1]], requires_grad=True)
    loss, stats = sapo_loss(logp, old, adv, mask, level="sequence", agg="seq_mean_token_mean")
    assert_close(loss, torch.tensor(-2.2205028), **TIGHT)
    loss.backward()
    assert_close(logp.grad, torch.tensor([[-0.6032781, -0.6032781]]), **TIGHT)
    assert stats["ratio_mean"].item() == pytest.approx(1.2214028)
    clipped = torch.tensor([[0.5, -0.1]], requires_grad=True)
    policy_loss(clipped, old, adv, mask, 0.2, level="sequence")[0].backward()
    assert torch.equal(clipped.grad, torch.zeros(1, 2))


@pytest.mark.parametrize(("tau_pos", "tau_neg"), [(1.0, 1.05), (0.1, 3.0)])
def test_sapo_on_policy_gradient_is_the_policy_gradient(tau_pos: float, tau_neg: float):
    """At r = 1 the gate's derivative is 4 * 1/2 * 1/2 = 1 for any tau: the gradient is PPO-clip's, -A / N."""
    grads = []
    for loss_fn, kw in ((sapo_loss, {"tau_pos": tau_pos, "tau_neg": tau_neg}), (policy_loss, {})):
        logp = LOGP.clone().requires_grad_(True)
        loss_fn(logp, LOGP, ADV, MASK, 0.2, **kw)[0].backward()
        grads.append(logp.grad)
    assert_close(grads[0], grads[1])
    assert_close(grads[0], -ADV * MASK / 5)


def test_sapo_refuses_a_non_positive_temperature():
    with pytest.raises(ValueError, match="tau_pos"):
        sapo_loss(LOGP, OLD, ADV, MASK, tau_pos=0.0)


# ---- the update's seam (steps/rl_update._micro_step) -------------------------------------------------
def test_the_update_uses_the_named_loss():
    """On-policy (r = 1), rows of 2 tokens with A = 1 and A = -0.5, token mean over 4 tokens: PPO-clip's loss is
    -mean A = (-2 + 1) / 4 = -0.25; SAPO's -mean (4 / tau) (1/2) A = (-2 * 2 + 2 * 1 / 1.05) / 4 = -0.5238095;
    CISPO's -mean A logp. All three have the plain policy gradient there: equal gradients."""
    exp = experience([2, 2], [1.0, -0.5], on_policy=True, width=2)
    out = {name: run(grpo(policy_loss=name), exp, micro=2) for name in ("ppo_clip", "sapo", "cispo")}
    logp = exp.rollout.logprobs  # the update's own forward, written back by the on-policy shortcut
    assert out["ppo_clip"][0]["policy_loss"] == pytest.approx(-0.25, abs=1e-6)
    assert out["sapo"][0]["policy_loss"] == pytest.approx((-4 + 2 / 1.05) / 4, abs=1e-6)
    cispo = -(logp[0].sum() - 0.5 * logp[1].sum()).item() / 4
    assert out["cispo"][0]["policy_loss"] == pytest.approx(cispo, abs=1e-6) and abs(cispo) > 0.1
    assert_close(out["sapo"][1], out["ppo_clip"][1])
    assert_close(out["cispo"][1], out["ppo_clip"][1])
    assert out["sapo"][0]["policy_gate_mean"] == pytest.approx(1.0) and out["sapo"][0]["policy_gatefrac"] == 0
    assert out["cispo"][0]["policy_clipfrac"] == 0 and "policy_gate_mean" not in out["cispo"][0]


def test_mis_drops_out_of_band_tokens_in_the_update():
    """rollout.is_correction=mis: old = the actor's own log-probs (r = 1), sampler = old - log w with w = [0.5, 3]
    (A = +1) and [1, 0.25] (A = -1); band [0.4, 4] keeps all but 0.25: loss (-1 - 1 + 1 + 0) / 4 = -0.25, a quarter
    dropped. The default band [1 / 4, 4] keeps 0.25 (closed band): loss 0."""

    exp = weighted_experience([[0.5, 3.0], [1.0, 0.25]], [1.0, -1.0])
    cfg = grpo()
    cfg.rollout.is_correction, cfg.rollout.is_cap, cfg.rollout.is_low = "mis", 4.0, 0.4
    stats, _, _ = run(cfg, exp, micro=2)
    assert stats["policy_loss"] == pytest.approx(-0.25, abs=1e-6)
    assert stats["is_masked_frac"] == 0.25 and stats["is_masked_frac_low"] == 0.25 and stats["is_weight_mean"] == 0.75
    cfg.rollout.is_low = None
    stats, _, _ = run(cfg, exp, micro=2)
    assert abs(stats["policy_loss"]) < 1e-6 and stats["is_masked_frac"] == 0
