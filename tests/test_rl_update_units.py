"""The policy update (`steps/rl_update.policy_update`) on hand-built experience with tiny fake models (issue 23,
bugs 2, 3, 5, 9): which beta the KL term uses, GSPO's aggregation, seq_mean_token_mean over a whole mini-batch,
and gradients that do not depend on how a mini-batch is cut into micro-batches."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from chatrl.algorithms.controllers import AdaptiveKLController
from chatrl.config_rl import PPOConfig
from rl_update_harness import TableCritic, TableLM, experience, grpo, run, weighted_experience


@pytest.fixture(autouse=True)
def in_order(monkeypatch):
    """Mini-batches in row order (the update shuffles), so a test chooses what each micro-batch holds."""
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: torch.arange(n))


# ----------------------------------------------------------------------------- bug 5: seq_mean_token_mean


def test_seq_mean_token_mean_is_the_mean_over_the_whole_mini_batch():
    # the audit's example: micro-batches [a, empty] and [b, c] with row means 1, 2, 4 (loss -A per token at ratio 1);
    # the empty row (e.g. a truncated reply under mask_truncated) counts in no mean: (1 + 2 + 4) / 3 = 7/3.
    # Per micro-batch it would be (1/1 + (2 + 4)/2) / 2 = 2.
    exp = experience([2, 0, 3, 1], [-1.0, 0.0, -2.0, -4.0])
    stats, grad_2x2, _ = run(grpo(loss_agg="seq_mean_token_mean"), exp, micro=2)
    assert stats["policy_loss"] == pytest.approx(7 / 3, abs=1e-6)
    _, grad_1x4, _ = run(grpo(loss_agg="seq_mean_token_mean"), exp, micro=4)
    assert_close(grad_2x2, grad_1x4, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- bug 3: GSPO's aggregation


def test_gspo_weighs_each_sequence_once_by_default():
    # the audit's example, s = 1: row 0 has 1 token and A = +1, row 1 has 3 tokens and A = -1.
    # GSPO's objective (1/G) sum_i -s_i A_i = (-1 + 1)/2 = 0; a token mean would give (-1 + 3)/4 = 0.5.
    cfg = grpo(importance_sampling_level="sequence")
    assert cfg.grpo.aggregation == "seq_mean_token_mean"
    stats, _, _ = run(cfg, experience([1, 3], [1.0, -1.0]), micro=2)
    assert stats["policy_loss"] == pytest.approx(0.0, abs=1e-6)
    explicit, _, _ = run(grpo(importance_sampling_level="sequence", loss_agg="token_mean"),
                         experience([1, 3], [1.0, -1.0]), micro=2)
    assert explicit["policy_loss"] == pytest.approx(0.5, abs=1e-6)  # still there when asked for
    assert grpo().grpo.aggregation == "token_mean"  # token-level ratio: DAPO's token mean stays the default


# ----------------------------------------------------------------------------- bug 2: beta of the KL in the loss


def ppo_kl_in_loss() -> PPOConfig:
    cfg = PPOConfig()
    cfg.rollout.max_new_tokens = 4
    cfg.ppo.kl_in, cfg.ppo.kl_estimator, cfg.ppo.kl_coef = "loss", "k3", 0.05
    cfg.ppo.kl_target, cfg.ppo.kl_horizon = 1.0, 100.0
    return cfg


def test_kl_in_the_loss_uses_the_controllers_beta():
    # the audit's example: kl_coef 0.05, kl_target 1, horizon 100, rollout 16, measured KL 10 nats:
    # beta = 0.05 * (1 + 0.2 * 16 / 100) = 0.0516 after one iteration, 0.0516 * 1.032 = 0.05325 after two
    ctl = AdaptiveKLController(0.05, 1.0, 100.0)
    ctl.update(10.0, 16)
    ctl.update(10.0, 16)
    assert ctl.value == pytest.approx(0.05 * 1.032 ** 2)
    lengths, zero_adv = [3, 4], [0.0, 0.0]  # no policy-gradient term: the actor's gradient is beta * grad KL
    _, grad_unit, _ = run(ppo_kl_in_loss(), experience(lengths, zero_adv, kl_coef=1.0), micro=2, reference=True)
    _, grad, _ = run(ppo_kl_in_loss(), experience(lengths, zero_adv, kl_coef=ctl.value), micro=2, reference=True)
    assert grad_unit.abs().max() > 1e-3
    assert_close(grad, 0.05 * 1.032 ** 2 * grad_unit, atol=1e-7, rtol=1e-5)  # not 0.05 * grad_unit


# ----------------------------------------------------------------------------- bug 9: 1 x 2b == 2 x b


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_value_loss_and_entropy_gradients_do_not_depend_on_the_micro_batches(agg):
    # rows of 1, 0, 4 and 3 tokens: per-micro-batch means would weigh the 1 token of [1, 0] like the 7 of [4, 3]
    # (and, per sequence, the one counted row of [1, 0] like the two of [4, 3])
    cfg = PPOConfig()
    cfg.rollout.max_new_tokens = 4
    cfg.ppo.loss_agg, cfg.ppo.entropy_coef, cfg.ppo.kl_coef, cfg.ppo.value_clip_eps = agg, 0.1, 0.0, 0.2
    exp = experience([1, 0, 4, 3], [0.0] * 4, on_policy=False)  # A = 0: the actor's gradient is the bonus only
    stats_1, actor_1, critic_1 = run(cfg, exp, micro=4, critic=True)
    stats_2, actor_2, critic_2 = run(cfg, exp, micro=2, critic=True)
    assert actor_1.abs().max() > 1e-4 and critic_1.abs().max() > 1e-4
    assert_close(actor_2, actor_1, atol=1e-7, rtol=1e-5)
    assert_close(critic_2, critic_1, atol=1e-7, rtol=1e-5)
    assert stats_2["value_loss"] == pytest.approx(stats_1["value_loss"], rel=1e-5)


def test_value_loss_is_the_token_mean_over_the_mini_batch():
    # two micro-batches of one row each, 1 and 3 tokens, no value clip: the loss DeepSpeed sees (the mean of the
    # micro-batches' losses) is 0.5 * the mean of (V - R)^2 over the 4 tokens, not the mean of the two rows' means
    cfg = PPOConfig()
    cfg.rollout.max_new_tokens = 4
    cfg.ppo.kl_coef, cfg.ppo.value_clip_eps = 0.0, None
    exp = experience([1, 3], [0.0, 0.0], on_policy=False)
    stats, _, _ = run(cfg, exp, micro=1, critic=True)
    r, table = exp.rollout, TableCritic().table.detach()
    v = table[r.response_ids.roll(1, dims=1)]  # V(s_t) is read at the token before t: the prompt's for t = 0
    v[:, 0] = table[r.prompt_ids[:, 0]]
    err = ((v - exp.returns) ** 2 * r.action_mask).tolist()
    token_mean = 0.5 * (sum(err[0]) + sum(err[1])) / 4
    per_row = 0.5 * (err[0][0] / 1 + sum(err[1]) / 3) / 2
    assert abs(token_mean - per_row) > 1e-3
    assert stats["value_loss"] == pytest.approx(token_mean, rel=1e-5)


def test_the_entropy_bonus_raises_the_entropy():
    # A = 0 and no KL: the actor's loss is -c * H alone, so a small step down its gradient must raise H
    cfg = PPOConfig()
    cfg.rollout.max_new_tokens = 4
    cfg.ppo.entropy_coef, cfg.ppo.kl_coef = 0.1, 0.0
    exp = experience([2, 4], [0.0, 0.0], on_policy=False)
    stats, grad, _ = run(cfg, exp, micro=2)
    r = exp.rollout
    inputs = torch.cat([r.prompt_ids, r.response_ids[:, :-1]], 1)  # the token before each response token

    def mean_entropy(table: torch.Tensor) -> float:
        p = torch.softmax(table[inputs], -1)
        h = -(p * p.log()).sum(-1)
        return float((h * r.action_mask).sum() / r.action_mask.sum())

    table = TableLM().table.detach()
    assert stats["entropy"] == pytest.approx(mean_entropy(table), rel=1e-5)
    assert mean_entropy(table - 0.5 * grad) > mean_entropy(table) + 1e-4


# ----------------------------------------------------------------------------- truncated importance sampling


def test_tis_weights_each_tokens_policy_term_in_the_update():
    """rollout.is_correction=tis: old log-probs = the actor's own (ratio 1), sampler log-probs = old - log w, so the
    weights are w = [0.5, 3 -> capped 2] (A = +1) and [1, 0.25] (A = -1): the token-mean loss is
    (-0.5 - 2 + 1 + 0.25) / 4 = -0.3125 (0 without the correction); mean weight 3.75 / 4, one token of 4 capped."""

    exp = weighted_experience([[0.5, 3.0], [1.0, 0.25]], [1.0, -1.0])
    cfg = grpo()
    stats, _, _ = run(cfg, exp, micro=2)
    assert abs(stats["policy_loss"]) < 1e-6 and "is_weight_mean" not in stats
    cfg.rollout.is_correction = "tis"
    stats, _, _ = run(cfg, exp, micro=2)
    assert stats["policy_loss"] == pytest.approx(-0.3125, abs=1e-6)
    assert stats["is_weight_mean"] == pytest.approx(0.9375, abs=1e-6) and stats["is_capped_frac"] == 0.25


def test_on_policy_update_records_its_first_forward_as_the_old_logprobs():
    """The on-policy shortcut skips the scoring pass (rollout.logprobs = 0): the update writes its own first forward
    there, so the agreement metrics compare the sampler with what the update used (micro-batches of 1 row each)."""
    from chatrl.steps.rl_experience import joined, response_logprobs

    exp = experience([2, 1, 2], [1.0, -1.0, 0.5], on_policy=True, width=2)
    r = exp.rollout
    assert not r.logprobs.any()
    run(grpo(), exp, micro=1)
    ids, attn = joined(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
    with torch.no_grad():
        want = response_logprobs(TableLM(), ids, attn, 1)
    assert (want < -0.01).all()
    assert_close(r.logprobs, want)
