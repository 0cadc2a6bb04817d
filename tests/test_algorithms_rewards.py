"""Reward shaping and EOS handling against hand-computed numbers."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from chatrl.algorithms.rewards import last_token_index, shape_rewards

SCORES = torch.tensor([2.0, -3.0])
KL = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_shape_rewards_by_hand():
    # beta 0.5: -0.5*kl on real tokens; score added at the last real token (col 2 / col 1)
    # row 0: -0.05, -0.10, -0.15 + 2 = 1.85, 0      row 1: -0.25, -0.30 - 3 = -3.30, 0, 0
    expected = torch.tensor([[-0.05, -0.10, 1.85, 0.0], [-0.25, -3.30, 0.0, 0.0]])
    assert_close(shape_rewards(SCORES, KL, MASK, beta=0.5), expected)


def test_shape_rewards_clips_score():
    # clip 1: scores -> [1, -1]; row 0 last: -0.15 + 1 = 0.85, row 1 last: -0.30 - 1 = -1.30
    expected = torch.tensor([[-0.05, -0.10, 0.85, 0.0], [-0.25, -1.30, 0.0, 0.0]])
    assert_close(shape_rewards(SCORES, KL, MASK, beta=0.5, clip=1.0), expected)


def test_shape_rewards_ignores_padding_and_empty_rows():
    noisy_kl = torch.where(MASK.bool(), KL, torch.full_like(KL, 1e4))
    assert torch.equal(shape_rewards(SCORES, noisy_kl, MASK, 0.5), shape_rewards(SCORES, KL, MASK, 0.5))
    empty = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    out = shape_rewards(SCORES, KL, empty, beta=0.5)
    assert torch.equal(out[1], torch.zeros(4))  # nowhere to put the score, and no KL on padding
    # beta 0: only the score, exactly at the last real token
    assert torch.equal(shape_rewards(SCORES, KL, MASK, 0.0), torch.tensor([[0, 0, 2.0, 0], [0, -3.0, 0, 0]]))


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 1, 0, 2, 3]

