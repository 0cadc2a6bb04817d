"""The rollout sampler (`chatrl.rollout.sampling.pick_tokens`) draws from the right distribution.

Each test draws N tokens from fixed logits in one batched call and runs Pearson's chi-square goodness-of-fit test
against the distribution the settings define. The p-value comes from the chi-square survival function,
P(chi2_df >= x) = Q(df/2, x/2) (Q = the regularized upper incomplete gamma function, `torch.special.gammaincc`),
so no scipy and no hard-coded quantiles. Draws are seeded: each outcome is fixed, and a correct sampler passes a
given seed with probability 1 - P_MIN. Power: each test also checks that the same test REJECTS the distribution of a
sampler that ignores the setting under test (T=1 instead of 0.5 or 2, top-p before temperature, ...); with these N
and logits those p-values are below 1e-50 (measured), far under P_MIN.
"""

from __future__ import annotations

import math

import pytest
import torch

from chatrl.rollout.sampling import GenerationSettings, pick_tokens
from helpers import P_MIN, Z, chi2_pvalue, nucleus

N = 20_000


def draw(settings: GenerationSettings, logits: torch.Tensor = Z, n: int = N) -> torch.Tensor:
    """Counts per column of n draws (one batched call) from the [V] logits."""
    gen = torch.Generator().manual_seed(settings.seed if settings.seed is not None else 0)
    toks = pick_tokens(logits[None].repeat(n, 1), settings, gen)
    return torch.bincount(toks, minlength=logits.numel())


def test_chi2_pvalue_against_closed_forms_and_tables():
    # df = 2 (3 cells): the survival function is exp(-x/2) exactly. Counts 30/30/60 against 1/3 each: expected 40,
    # statistic (100 + 100 + 400) / 40 = 15.
    p = chi2_pvalue(torch.tensor([30, 30, 60]), torch.full((3,), 1 / 3))
    assert p == pytest.approx(math.exp(-15 / 2), rel=1e-9)
    # df = 7 (8 cells): the 99.9% and 99.99% points of chi2_7 in published tables are 24.322 and 29.877.
    for x, tail in ((24.322, 1e-3), (29.877, 1e-4)):
        g = torch.special.gammaincc(torch.tensor(3.5, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64))
        assert float(g) == pytest.approx(tail, rel=2e-3)
    # and the statistic itself, hand-computed: counts 30/70 against 50/50 -> (20^2 + 20^2) / 50 = 16, df 1.
    p = chi2_pvalue(torch.tensor([30, 70]), torch.tensor([0.5, 0.5]))
    assert p == pytest.approx(math.erfc(math.sqrt(16 / 2)), rel=1e-9)  # chi2_1 survival = erfc(sqrt(x/2))
    assert chi2_pvalue(torch.tensor([5, 1]), torch.tensor([1.0, 0.0])) == 0.0


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_frequencies_follow_softmax_of_scaled_logits(temperature):
    counts = draw(GenerationSettings(do_sample=True, temperature=temperature, seed=11))
    want = torch.softmax(Z / temperature, -1)
    assert want.min() * N > 100  # every cell large enough for the chi-square approximation
    assert chi2_pvalue(counts, want) > P_MIN, (counts, want * N)
    # Power: the same test rejects the untempered distribution (a sampler ignoring temperature fails here).
    assert chi2_pvalue(counts, torch.softmax(Z, -1)) < P_MIN


def test_top_k_draws_stay_in_the_top_k_with_renormalised_frequencies():
    s = GenerationSettings(do_sample=True, temperature=0.7, top_k=3, seed=12)
    counts = draw(s)
    top3 = torch.topk(Z, 3).indices  # columns 1, 5, 3
    outside = torch.ones(8, dtype=torch.bool)
    outside[top3] = False
    assert counts[outside].sum() == 0 and (counts[top3] > 0).all()
    want = torch.zeros(8)
    want[top3] = torch.softmax(Z[top3] / 0.7, -1)
    assert chi2_pvalue(counts, want) > P_MIN, (counts, want * N)
    # Power: sampling the top 3 at T=1 instead (temperature dropped after top-k) is rejected.
    at_t1 = torch.zeros(8)
    at_t1[top3] = torch.softmax(Z[top3], -1)
    assert chi2_pvalue(counts, at_t1) < P_MIN


def test_top_p_draws_stay_in_the_nucleus_with_renormalised_frequencies():
    temperature, top_p = 1.5, 0.6
    probs = torch.softmax(Z / temperature, -1)
    want = nucleus(probs, top_p)
    kept = want > 0
    assert 3 <= int(kept.sum()) <= 6  # a real cut: not everything, not just the top token
    # top_p is not near a boundary of the kept set (float rounding cannot change the set)
    cum = torch.cumsum(torch.sort(probs, descending=True).values, 0)
    assert (cum - top_p).abs().min() > 0.01
    counts = draw(GenerationSettings(do_sample=True, temperature=temperature, top_p=top_p, seed=13))
    assert counts[~kept].sum() == 0 and (counts[kept] > 0).all()
    assert chi2_pvalue(counts, want) > P_MIN, (counts, want * N)
    # Power: the unfiltered distribution (a sampler ignoring top_p) expects thousands of draws where there are none,
    # and the nucleus of the untempered distribution (top_p applied before temperature) is rejected too.
    assert chi2_pvalue(counts, probs) < P_MIN
    assert chi2_pvalue(counts, nucleus(torch.softmax(Z, -1), top_p)) < P_MIN


def test_top_k_then_top_p_uses_the_renormalised_top_k_mass():
    """HF order: temperature -> top-k -> top-p, top-p measured on the top-k distribution (renormalised)."""
    temperature, top_k, top_p = 0.8, 5, 0.75
    topk = torch.topk(Z, top_k).indices
    in_k = torch.zeros(8)
    in_k[topk] = torch.softmax(Z[topk] / temperature, -1)
    want = nucleus(in_k, top_p)
    # the nucleus over all 8 tokens would keep a different set: the test can tell the two orders apart
    assert not torch.equal(want > 0, nucleus(torch.softmax(Z / temperature, -1), top_p) > 0)
    counts = draw(GenerationSettings(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, seed=14))
    assert counts[want == 0].sum() == 0
    assert chi2_pvalue(counts, want) > P_MIN, (counts, want * N)


def test_rows_are_independent_of_each_other():
    """Different logits per row in one call: each row's draws follow its own distribution."""
    n = N // 2
    logits = torch.stack([Z, Z.flip(0)]).repeat_interleave(n, 0)  # rows 0..n-1: Z; n..2n-1: reversed
    s = GenerationSettings(do_sample=True, temperature=0.5, seed=15)
    toks = pick_tokens(logits, s, torch.Generator().manual_seed(15))
    for half, z in ((toks[:n], Z), (toks[n:], Z.flip(0))):
        assert chi2_pvalue(torch.bincount(half, minlength=8), torch.softmax(z / 0.5, -1)) > P_MIN
