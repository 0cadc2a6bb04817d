"""The KL in the loss (issue 23, bug 1): what each estimator's gradient pulls toward, in exact expectation over a
small categorical, and the config check that refuses the estimators whose expected gradient is no KL's."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from chatrl.algorithms.kl import LOSS_KL_ESTIMATORS, kl_loss
from chatrl.config_rl import GRPOConfig, PPOConfig
from chatrl.configbase import load_config
from chatrl.errors import ChatrlError

PI = torch.tensor([0.5, 0.3, 0.2])
REF = torch.tensor([0.2, 0.3, 0.5])
# By hand, with z the logits of pi (softmax), d = log pi - log ref = [log 2.5, 0, log 0.4] = [0.916291, 0, -0.916291]:
#   grad_z KL(pi || ref) = pi * (d - E_pi d),  E_pi d = 0.5 * 0.916291 - 0.2 * 0.916291 = 0.274887
#                        = [0.5 * 0.641404, 0.3 * -0.274887, 0.2 * -1.191178] = [0.320702, -0.082466, -0.238236]
#   grad_z KL(ref || pi) = pi - ref = [0.3, 0, -0.3]
GRAD_REVERSE_KL = torch.tensor([0.320702, -0.082466, -0.238236])
GRAD_FORWARD_KL = torch.tensor([0.3, 0.0, -0.3])


def expected_gradient(kind: str) -> torch.Tensor:
    """E_{a ~ pi}[grad_z kl_loss] with the samples a held fixed (on-policy: the sampler is not differentiated):
    every token of the vocabulary is one 'sampled' token, weighted by its probability instead of drawn."""
    z = PI.log().clone().requires_grad_(True)
    logp = torch.log_softmax(z, dim=-1).unsqueeze(0)  # [1, V]: log pi(a) for a = each token
    weights = PI.unsqueeze(0)

    def expectation(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (per_token * weights * mask).sum()

    kl_loss(logp, REF.log().unsqueeze(0), torch.ones(1, 3), kind, agg=expectation).backward()
    return z.grad


def test_k2_in_the_loss_is_the_gradient_of_the_reverse_kl():
    assert_close(expected_gradient("k2"), GRAD_REVERSE_KL, atol=2e-6, rtol=0)


def test_k3_in_the_loss_is_the_gradient_of_the_forward_kl():
    assert_close(expected_gradient("k3"), GRAD_FORWARD_KL, atol=2e-6, rtol=0)


def test_k1_in_the_loss_has_zero_expected_gradient():
    assert_close(expected_gradient("k1"), torch.zeros(3), atol=1e-7, rtol=0)
    assert "k1" not in LOSS_KL_ESTIMATORS and "abs" not in LOSS_KL_ESTIMATORS


def test_the_hand_numbers_are_those_kls_gradients():
    # guards the constants above: autograd of the two KLs themselves
    z = PI.log().clone().requires_grad_(True)
    p = torch.softmax(z, -1)
    (p * (p.log() - REF.log())).sum().backward()
    assert_close(z.grad, GRAD_REVERSE_KL, atol=2e-6, rtol=0)
    z.grad = None
    (REF * (REF.log() - torch.softmax(z, -1).log())).sum().backward()
    assert_close(z.grad, GRAD_FORWARD_KL, atol=2e-6, rtol=0)
    assert math.isclose(0.5 * math.log(2.5) + 0.2 * math.log(0.4), 0.274887, abs_tol=1e-6)


PPO_BASE = ["reward.functions=[m:f]"]


@pytest.mark.parametrize("kind", ["k1", "abs"])
def test_kl_in_the_loss_refuses_estimators_without_a_kl_gradient(kind):
    with pytest.raises(ChatrlError) as err:
        load_config(PPOConfig, None, [*PPO_BASE, "ppo.kl_in=loss", f"ppo.kl_estimator={kind}"])
    msg = str(err.value)
    assert "\n" not in msg and f"ppo.kl_estimator={kind}" in msg and "ppo.kl_in=loss" in msg
    assert "k2 (grad KL(pi||ref))" in msg and "k3 (grad KL(ref||pi))" in msg
    with pytest.raises(ChatrlError, match=f"grpo.kl_estimator={kind}"):
        load_config(GRPOConfig, None, ["env.name=arithmetic", "grpo.kl_coef=0.1", f"grpo.kl_estimator={kind}"])


def test_kl_in_the_loss_accepts_k2_and_k3_and_any_estimator_in_the_reward_or_without_kl():
    for kind in ("k2", "k3"):
        load_config(PPOConfig, None, [*PPO_BASE, "ppo.kl_in=loss", f"ppo.kl_estimator={kind}"])
    load_config(PPOConfig, None, [*PPO_BASE, "ppo.kl_estimator=k1"])  # the KL in the rewards: k1 is fine
    load_config(GRPOConfig, None, ["env.name=arithmetic", "grpo.kl_estimator=k1"])  # kl_coef 0: no KL at all
