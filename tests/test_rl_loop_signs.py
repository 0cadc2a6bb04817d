"""Signs and argument orders in the RL loop's wiring, on hand-built tensors and fake models whose log-probs are
worked out by hand (`helpers.FixedLogitsLM`): the KL estimate of `make_experience` is kl(actor, reference) and
enters the rewards as -beta * kl; the update adds + beta * KL and subtracts the entropy bonus."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from chatrl.batches import Rollout
from chatrl.config_rl import BatchPlan, GRPOConfig
from chatrl.rollout.episodes import EpisodeBatch
from chatrl.steps.rl import make_experience
from chatrl.steps.rl_experience import Scored
from chatrl.steps.rl_update import Experience, policy_update
from helpers import FakeEngine, FixedLogitsLM

CPU = torch.device("cpu")
LN2 = math.log(2.0)

# ----------------------------------------------------------------------------- make_experience: the KL


def two_episodes() -> Scored:
    """One group of two one-turn episodes: replies [3, 4, 5] and [6] (3 and 1 action tokens), score 0, EOS."""
    batch = EpisodeBatch(prompt_ids=[[1, 2], [1]], response_ids=[[3, 4, 5], [6]], action_mask=[[1, 1, 1], [1]],
                         turn_ends=[[2], [0]], turn_rewards=[[0.0], [0.0]], last_reply_ids=[[3, 4, 5], [6]],
                         last_reply_eos=[True, True], prompts=[[], []], conversations=[[], []], infos=[{}, {}],
                         success=[False, False], truncated=[False, False], context_truncated=[False, False])
    zeros = torch.zeros(2)
    return Scored(batch, score=zeros, outcome=zeros.clone(), has_eos=torch.ones(2, dtype=torch.bool), by_function={},
                  rm_score=None)


def models() -> SimpleNamespace:
    """Vocabulary of 10. The actor is uniform: log pi = -ln 10 on every token. The reference puts e^z = 11 on token
    0 and 1 on the nine others (sum 20): log pi_ref = -ln 20 on the reply tokens 3..6. So log pi - log pi_ref = ln 2
    on every action (the reference says ln 2 less)."""
    ref_logits = [math.log(11.0)] + [0.0] * 9
    return SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0), hybrid=SimpleNamespace(device=CPU),
                           actor=FixedLogitsLM([0.0] * 10), reference=FixedLogitsLM(ref_logits), critic=None,
                           teacher=None, eval_mode=lambda: None, train_mode=lambda: None)


@pytest.mark.parametrize(("estimator", "per_token"), [
    ("k1", LN2),                   # log pi - log pi_ref = ln 2            (arguments swapped: -ln 2)
    ("k3", 0.5 - 1 + LN2),         # e^-ln2 - 1 + ln 2 = 0.193147           (arguments swapped: 2 - 1 - ln 2 = 0.306853)
])
def test_make_experience_kl_is_actor_against_reference_and_a_penalty(estimator: str, per_token: float) -> None:
    cfg = GRPOConfig()
    cfg.rollout.samples_per_prompt = 2
    cfg.grpo.advantage, cfg.grpo.kl_in, cfg.grpo.kl_estimator, cfg.grpo.kl_coef = "dr_grpo", "reward", estimator, 0.1
    exp = make_experience(models(), cfg, two_episodes(), beta=0.1, times={})
    mask = exp.rollout.action_mask
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert_close(exp.rollout.logprobs * mask, -math.log(10.0) * mask)
    assert_close(exp.kl, per_token * mask)
    # -beta * kl_t in the rewards: outcomes -0.1 * 3k and -0.1 * k (k = per-token KL); Dr. GRPO subtracts their
    # mean -0.2 k: the longer reply (more KL) gets -0.1 k on its tokens, the shorter +0.1 k (a KL that rewarded
    # moving away from the reference would flip both)
    want = torch.tensor([[-0.1 * per_token] * 3, [0.1 * per_token, 0.0, 0.0]])
    assert_close(exp.advantages, want, atol=1e-7, rtol=1e-6)


def test_without_a_kl_in_the_rewards_the_kl_only_is_logged() -> None:
    # kl_in=loss: the same KL estimate, no reward penalty: both outcomes 0, advantages 0
    cfg = GRPOConfig()
    cfg.rollout.samples_per_prompt = 2
    cfg.grpo.advantage, cfg.grpo.kl_in, cfg.grpo.kl_estimator, cfg.grpo.kl_coef = "dr_grpo", "loss", "k3", 0.1
    exp = make_experience(models(), cfg, two_episodes(), beta=0.1, times={})
    assert_close(exp.kl, (0.5 - 1 + LN2) * exp.rollout.action_mask)
    assert exp.advantages.abs().max().item() == 0.0


# ----------------------------------------------------------------------------- the update: KL term and entropy bonus


def update_gradient(cfg: GRPOConfig, *, kl_coef: float = 0.0, reference: bool = False) -> tuple[dict, torch.Tensor]:
    """policy_update on 2 rows of 3 action tokens, all token 1, advantage 0 (no policy-gradient term), old log-probs
    = the actor's own (ratio 1), reference log-prob ln 0.5 on every token. The actor is FixedLogitsLM([0, ln 3]):
    pi = [0.25, 0.75] at every position. Returns the logged stats and the gradient of the logits vector."""
    rows, width = 2, 3
    cfg.rollout.max_new_tokens = width
    cfg.grpo.ppo_epochs, cfg.grpo.mini_batches, cfg.grpo.micro_batch_size = 1, 1, rows
    ones, zeros = torch.ones(rows, width), torch.zeros(rows, width)
    rollout = Rollout(prompt_ids=torch.zeros(rows, 1, dtype=torch.long), prompt_mask=torch.ones(rows, 1),
                      response_ids=torch.ones(rows, width, dtype=torch.long), response_mask=ones.clone(),
                      action_mask=ones.clone(), logprobs=zeros.clone(), ref_logprobs=torch.full((rows, width), -LN2),
                      values=zeros.clone(), scores=torch.zeros(rows))
    exp = Experience(rollout, zeros.clone(), zeros.clone(), zeros.clone(), on_policy=True, kl_coef=kl_coef)
    actor = FixedLogitsLM([0.0, math.log(3.0)])
    m = SimpleNamespace(actor=FakeEngine(actor), critic=None, reference=object() if reference else None,
                        ptx_batches=None)
    plan = BatchPlan(rollout=rows, per_process=rows, mini_batch=rows, grad_accum=1, world=1)
    stats = policy_update(m, exp, cfg, plan)
    return stats, actor.logits.grad


def test_entropy_bonus_is_subtracted_from_the_loss() -> None:
    # H(0.25, 0.75) = 0.562335; dH/dz_j = -p_j (ln p_j + H) = [+0.205990, -0.205990].
    # loss = 0 - 0.1 * H (every token has the same H, any aggregation gives H): grad = [-0.0205990, +0.0205990],
    # so a descent step raises z_0 and lowers z_1: towards uniform, higher entropy (a flipped sign lowers it)
    cfg = GRPOConfig()
    cfg.grpo.entropy_coef, cfg.grpo.kl_coef = 0.1, 0.0
    stats, grad = update_gradient(cfg)
    assert stats["entropy"] == pytest.approx(0.5623351, abs=1e-6)
    assert_close(grad, torch.tensor([-0.0205990, 0.0205990]), atol=1e-7, rtol=1e-5)


def test_kl_term_in_the_loss_pulls_towards_the_reference() -> None:
    # k3 with r = log pi_ref - log pi = ln 0.5 - ln 0.75 = ln(2/3): k3 = 2/3 - 1 - ln(2/3) = 0.0721318;
    # dk3/dlog pi = 1 - e^r = 1/3; dlog pi(1)/dz = e_1 - pi = [-0.25, +0.25] -> dk3/dz = [-1/12, +1/12].
    # loss = 0 + beta * k3 with the experience's beta 0.1: grad = [-0.0083333, +0.0083333]; a descent step lowers
    # pi(1) from 0.75 towards the reference's 0.5 (a flipped sign pushes it away)
    cfg = GRPOConfig()
    cfg.grpo.kl_in, cfg.grpo.kl_estimator, cfg.grpo.kl_coef, cfg.grpo.entropy_coef = "loss", "k3", 0.1, 0.0
    stats, grad = update_gradient(cfg, kl_coef=0.1, reference=True)
    assert stats["kl_loss"] == pytest.approx(2 / 3 - 1 - math.log(2 / 3), abs=1e-6)
    assert_close(grad, torch.tensor([-0.1 / 12, 0.1 / 12]), atol=1e-7, rtol=1e-5)
