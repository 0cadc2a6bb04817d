"""masked.py against hand-computed numbers; padding never changes a result."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from chatrl.algorithms.masked import masked_mean, masked_sum, masked_var, masked_whiten, zero_masked

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])


def garbage(x: torch.Tensor, mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """x with every masked-out entry replaced by large random values."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g) * 1e3
    return torch.where(mask.bool(), x, noise)


def test_sum_and_mean_by_hand():
    # counted entries: 1, 2, 4 -> sum 7, mean 7/3; per row: [1+2, 4] and [3/2, 4/1]
    assert masked_sum(X, M).item() == 7.0
    assert_close(masked_mean(X, M), torch.tensor(7 / 3))
    assert_close(masked_sum(X, M, dim=-1), torch.tensor([3.0, 4.0]))
    assert_close(masked_mean(X, M, dim=-1), torch.tensor([1.5, 4.0]))


def test_var_by_hand():
    # mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9 = 14/3
    # unbiased: (14/3) / (3 - 1) = 7/3; biased: (14/3) / 3 = 14/9
    assert_close(masked_var(X, M), torch.tensor(7 / 3))
    assert_close(masked_var(X, M, unbiased=False), torch.tensor(14 / 9))


def test_whiten_by_hand():
    # (x - 7/3) / sqrt(7/3) on counted entries, 0 on padding
    std = math.sqrt(7 / 3)
    expected = torch.tensor([[-4 / 3, -1 / 3, 0.0], [5 / 3, 0.0, 0.0]]) / std
    assert_close(masked_whiten(X, M), expected)
    # shift_mean=False adds the mean back on counted entries: -0.8729 + 2.3333 = 1.4604 etc.
    assert_close(masked_whiten(X, M, shift_mean=False), expected + M * (7 / 3))


def test_whitened_has_zero_mean_unit_var():
    x = torch.randn(4, 9) * 5 + 3
    mask = (torch.rand(4, 9) > 0.3).long()
    w = masked_whiten(x, mask)
    assert abs(masked_mean(w, mask).item()) < 1e-5
    assert abs(masked_var(w, mask).item() - 1) < 1e-4


def test_padding_never_changes_results():
    y = garbage(X, M)
    assert not torch.equal(X, y)
    assert torch.equal(masked_sum(X, M), masked_sum(y, M))
    assert torch.equal(masked_mean(X, M, dim=-1), masked_mean(y, M, dim=-1))
    assert torch.equal(masked_var(X, M), masked_var(y, M))
    assert torch.equal(masked_whiten(X, M), masked_whiten(y, M))
    # even inf / NaN padding does not leak (where, not multiply)
    z = X.clone()
    z[0, 2], z[1, 1] = float("inf"), float("nan")
    assert_close(masked_mean(z, M), torch.tensor(7 / 3))
    assert torch.equal(zero_masked(z, M), torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]]))


def test_empty_and_single_masks_are_safe():
    empty = torch.zeros_like(M)
    for value in (masked_sum(X, empty), masked_mean(X, empty), masked_var(X, empty)):
        assert value.item() == 0.0
    assert torch.equal(masked_whiten(X, empty), torch.zeros_like(X))
    assert torch.equal(masked_mean(X, torch.tensor([[1, 1, 1], [0, 0, 0]]), dim=-1), torch.tensor([2.0, 0.0]))
    one = torch.tensor([[0, 1, 0], [0, 0, 0]])
    assert masked_var(X, one).item() == 0.0  # a single value has no spread (not 0/0)
    assert not torch.isnan(masked_whiten(X, one)).any()
