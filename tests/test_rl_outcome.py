"""One episode outcome everywhere (issue 23, bug 7): the clipped score, discounted like the last turn's environment
reward it shares a token with, plus the discounted environment return; the same number for dynamic sampling's tie
test, the logged reward, RFT's selection and the advantages. Hand-built episodes, fake reward model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from chatrl.config_offline import RFTConfig
from chatrl.config_rl import GRPOConfig
from chatrl.models.reward import TokenValueModel
from chatrl.reward_functions import RewardFunctions
from chatrl.rollout.episodes import EpisodeBatch
from chatrl.steps.rft_samples import build_scorer
from chatrl.steps.rl import make_experience, varied_groups
from chatrl.steps.rl_experience import episode_tensors, score_episodes

CPU = torch.device("cpu")


class RowScores(TokenValueModel):
    """A reward model that gives row i the score scores[i] (at every token, so at the last one too)."""

    def __init__(self, scores: list[float]) -> None:
        nn.Module.__init__(self)
        self.scores = torch.tensor(scores)

    def forward(self, input_ids, attention_mask):
        return self.scores[:, None].expand(input_ids.shape).clone()


def episodes(turn_rewards: list[list[float]]) -> EpisodeBatch:
    """Row 0 of two turns (reply [5, 6], environment tokens [7, 8], reply [9]) when given two rewards, else one
    turn of one token; every reply ends with EOS."""
    rows = []
    for rewards in turn_rewards:
        if len(rewards) == 2:
            rows.append(([1, 2], [5, 6, 7, 8, 9], [1, 1, 0, 0, 1], [1, 4], [9]))
        else:
            rows.append(([3], [4], [1], [0], [4]))
    n = len(rows)
    return EpisodeBatch(prompt_ids=[r[0] for r in rows], response_ids=[r[1] for r in rows],
                        action_mask=[r[2] for r in rows], turn_ends=[r[3] for r in rows], turn_rewards=turn_rewards,
                        last_reply_ids=[r[4] for r in rows], last_reply_eos=[True] * n, prompts=[[]] * n,
                        conversations=[[]] * n, infos=[{}] * n, success=[False] * n, truncated=[False] * n,
                        context_truncated=[False] * n)


def scored(batch: EpisodeBatch, rm_scores: list[float], gamma: float, clip: float | None):
    tensors = episode_tensors(batch, pad_id=0, gamma=gamma, device=CPU)
    return score_episodes(batch, tensors, RewardFunctions([]), RowScores(rm_scores), model_weight=1.0,
                          eos_penalty=0.0, overlong_buffer=0, overlong_factor=0.0, max_new_tokens=4, clip=clip)


def test_scores_that_clip_to_the_same_value_are_a_tie():
    # the audit's example: a G = 2 group with RM scores 6 and 7 and reward.clip = 5: both outcomes are 5, the
    # advantages are 0, so dynamic sampling must see a tied group (and the logged reward is 5, not 6.5)
    s = scored(episodes([[0.0], [0.0]]), [6.0, 7.0], gamma=1.0, clip=5.0)
    assert s.outcome.tolist() == [5.0, 5.0]
    assert varied_groups(s.outcome, 2) == [False]
    assert varied_groups(scored(episodes([[0.0], [0.0]]), [6.0, 7.0], 1.0, clip=None).outcome, 2) == [True]


def test_the_final_score_is_discounted_like_the_last_turn():
    # gamma 0.5. Row 0: two turns with environment rewards 1 and 2, score 3 on the last turn's last token:
    #   1 + 0.5 * 2 + 0.5 * 3 = 3.5 (undiscounted score: 5).  Row 1: one turn, reward 0, score 4: 4.
    s = scored(episodes([[1.0, 2.0], [0.0]]), [3.0, 4.0], gamma=0.5, clip=5.0)
    assert s.outcome.tolist() == pytest.approx([3.5, 4.0])
    assert s.score.tolist() == pytest.approx([1.5, 4.0])  # what lands on the last token


def test_the_advantages_compare_the_same_outcome():
    # make_experience on the rows above (GRPO, G = 2, no KL, no critic: the on-policy path, no model forward):
    # outcomes 3.5 and 4, mean 3.75, unbiased std sqrt(2 * 0.25^2) = 0.353553: advantages -0.707105, +0.707105
    # on every action token (with an undiscounted score row 0 would be 5 and the signs would flip)
    cfg = GRPOConfig()
    cfg.env.gamma, cfg.reward.clip, cfg.rollout.samples_per_prompt = 0.5, 5.0, 2
    batch = episodes([[1.0, 2.0], [0.0]])
    s = scored(batch, [3.0, 4.0], gamma=0.5, clip=5.0)
    m = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0), hybrid=SimpleNamespace(device=CPU),
                        actor=None, reference=None, critic=None, teacher=None, eval_mode=lambda: None,
                        train_mode=lambda: None)
    exp = make_experience(m, cfg, s, beta=0.0516, times={})
    mask = exp.rollout.action_mask
    want = torch.tensor([[-0.707105] * 5, [0.707105] + [0.0] * 4]) * mask
    torch.testing.assert_close(exp.advantages, want, atol=2e-5, rtol=0)
    assert exp.kl_coef == 0.0516  # the controller's beta travels with the experience (bug 2)


def test_rft_scores_with_the_reward_clip():
    cfg = RFTConfig()
    cfg.reward.clip = 2.5
    assert build_scorer(cfg, CPU).clip == 2.5
