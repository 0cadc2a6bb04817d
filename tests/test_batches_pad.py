"""batches.pad_rows: the one way rows of ids become [B, T] tensors."""

import pytest
import torch

from chatrl.batches import pad_rows


def test_right_and_left_padding_by_hand():
    ids, mask = pad_rows([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_rows([[5, 6, 7], [8]], 9, side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_empty_rows_and_no_rows_keep_their_shape():
    assert pad_rows([[], []], 0)[0].shape == (2, 0)
    assert pad_rows([], 0)[1].shape == (0, 0)
    ids, mask = pad_rows([[], []], 4, min_width=1)  # rl_experience: one response column even when every reply is empty
    assert ids.tolist() == [[4], [4]] and mask.tolist() == [[0], [0]]
    assert pad_rows([[1, 2, 3]], 0, side="left", min_width=2)[0].tolist() == [[1, 2, 3]]  # a floor, not a cut
    with pytest.raises(ValueError, match="side"):
        pad_rows([[1]], 0, side="middle")  # type: ignore[arg-type]
