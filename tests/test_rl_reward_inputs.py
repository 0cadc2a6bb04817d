"""The reward model scores a rollout's reply where `chatrl reward` trained it to: at the end-of-turn token, which is
appended to replies cut at max_new_tokens (issue 19: the PPO demo scored cut replies mid-sentence)."""

from __future__ import annotations

import torch

from chatrl.models.reward import end_token_index
from chatrl.steps.rl_experience import EpisodeTensors, reward_model_inputs

EOS, PAD = 2, 0


def _tensors() -> EpisodeTensors:
    # row 0: ended with EOS; row 1: cut at full width; row 2: cut after one token (right padding after it)
    prompt = torch.tensor([[PAD, 5, 6], [4, 5, 6], [PAD, PAD, 6]])
    pmask = (prompt != PAD).long()
    resp = torch.tensor([[7, EOS, PAD], [7, 8, 9], [7, PAD, PAD]])
    rmask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    zeros = torch.zeros(3, 3)
    return EpisodeTensors(prompt, pmask, resp, rmask, rmask.clone(), zeros, torch.ones(3))


def test_cut_replies_get_the_end_of_turn_token_and_finished_ones_stay() -> None:
    ids, mask = reward_model_inputs(_tensors(), [True, False, False], EOS)
    assert mask.tolist() == [[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0]]
    real = [[t for t, m in zip(r, mr, strict=True) if m] for r, mr in zip(ids.tolist(), mask.tolist(), strict=True)]
    assert real == [[5, 6, 7, EOS], [4, 5, 6, 7, 8, 9, EOS], [6, 7, EOS]]
    # the reward model reads each row's score at its last real token: the end-of-turn token in every row
    assert ids.gather(1, end_token_index(mask).unsqueeze(1)).squeeze(1).tolist() == [EOS, EOS, EOS]


def test_without_an_eos_id_the_ids_are_scored_as_sampled() -> None:
    ids, mask = reward_model_inputs(_tensors(), [True, False, False], None)
    assert ids.shape == (3, 6)
    assert ids.gather(1, end_token_index(mask).unsqueeze(1)).squeeze(1).tolist() == [EOS, 9, 7]
