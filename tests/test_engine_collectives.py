"""Cross-rank statistics on one process (issue 23, bug 4): whitening moments of uncentred data, such as
REINFORCE++ returns, must not cancel to nothing. The two-rank agreement is in test_rl_distributed.py."""

from __future__ import annotations

import pytest
import torch

from chatrl.algorithms.masked import masked_whiten
from chatrl.engine.collectives import barrier, global_moments, rank


@pytest.mark.parametrize("mean,sd", [(50.0, 0.01), (5.0, 1e-3)])
def test_global_moments_of_uncentred_values(mean, sd):
    # n = 20,000 values mean +- sd, alternating: mean exactly `mean`, unbiased variance sd^2 * n / (n - 1).
    # (fp32 stores mean +- sd within half an ulp of `mean`: 1.9e-6 at 50, 2.4e-7 at 5, i.e. < 2.4e-4 of sd.)
    # One pass in fp32, (sum x^2 - n mean^2) / (n - 1), gave 0 for (50, 0.01) and 1.56e-6 for (5, 1e-3) here.
    n = 20_000
    signs = torch.tensor([1.0, -1.0]).repeat(n // 2)
    x = (mean + sd * signs).reshape(100, 200)
    mask = torch.ones_like(x)
    mu, var = global_moments(x, mask)
    assert mu.item() == pytest.approx(mean, rel=1e-6)
    assert var.item() == pytest.approx(sd * sd * n / (n - 1), rel=1e-3)
    white = masked_whiten(x, mask, moments=global_moments)  # +-1 (eps 1e-8 shrinks it by at most 0.5%)
    assert white.abs().min().item() > 0.99 and white.abs().max().item() < 1.01


def test_global_moments_count_only_the_mask():
    x = torch.tensor([[1.0, 2.0, 1e6], [3.0, float("nan"), 4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    mu, var = global_moments(x, mask)
    # 1, 2, 3, 4: mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    assert mu.item() == pytest.approx(2.5) and var.item() == pytest.approx(5 / 3)


def test_rank_and_barrier_without_a_process_group():
    assert rank() == 0
    barrier()  # a no-op, not an error, in one process
