"""Each evaluation metric against a small hand-checked example (BLEU/ROUGE also against the libraries)."""

from __future__ import annotations

import math

import pytest
import torch

from chatrl.eval import metrics as M


def test_score_stats_mean_and_population_std():
    # mean 3; squared deviations 4, 1, 0, 9 -> variance 14 / 4 = 3.5
    stats = M.score_stats([1.0, 2.0, 3.0, 6.0])
    assert stats["mean"] == pytest.approx(3.0)
    assert stats["std"] == pytest.approx(math.sqrt(3.5))
    assert math.isnan(M.score_stats([])["mean"])


def test_mean_se_by_hand():
    # values 1, 2, 6: mean 3; squared deviations 4, 1, 9 -> sample variance 14 / 2 = 7; se = sqrt(7 / 3)
    assert M.mean_se([1.0, 2.0, 6.0]) == pytest.approx(math.sqrt(7 / 3))
    assert M.mean_se([4.0, 4.0, 4.0]) == 0.0
    assert math.isnan(M.mean_se([5.0])) and math.isnan(M.mean_se([]))


def test_proportion_se_by_hand():
    # p = 0.2 on 100 trials: sqrt(0.2 * 0.8 / 100) = 0.04
    assert M.proportion_se(0.2, 100) == pytest.approx(0.04)
    assert M.proportion_se(1.0, 10) == 0.0
    assert math.isnan(M.proportion_se(0.5, 0))


def test_paired_difference_is_new_minus_baseline_by_hand():
    # new [1, 2, 3] against baseline [0, 2, 5]: differences 1, 0, -2, mean -1/3;
    # deviations 4/3, 1/3, -5/3 -> squares (16 + 1 + 25) / 9 = 42 / 9, sample variance 21 / 9 = 7 / 3,
    # se = sqrt(7 / 3 / 3) = sqrt(7) / 3
    got = M.paired_difference([1.0, 2.0, 3.0], [0.0, 2.0, 5.0])
    assert got.mean == pytest.approx(-1 / 3) and got.se == pytest.approx(math.sqrt(7) / 3)
    assert (got.wins, got.losses, got.ties) == (1, 1, 1) and got.win_rate == pytest.approx(0.5)
    swapped = M.paired_difference([0.0, 2.0, 5.0], [1.0, 2.0, 3.0])
    assert swapped.mean == pytest.approx(1 / 3) and (swapped.wins, swapped.losses) == (1, 1)


def test_paired_difference_of_solved_tasks_counts_booleans_as_0_1():
    # new solves tasks 0, 1, 4; baseline 1, 3: differences 1, 0, 0, -1, 1 -> mean 0.2,
    # sample variance (0.64 + 0.04 + 0.04 + 1.44 + 0.64) / 4 = 0.7, se sqrt(0.7 / 5)
    got = M.paired_difference([True, True, False, False, True], [False, True, False, True, False])
    assert got.mean == pytest.approx(0.2) and got.se == pytest.approx(math.sqrt(0.7 / 5))
    assert (got.wins, got.losses, got.ties) == (2, 1, 2)


def test_paired_difference_needs_pairs():
    assert math.isnan(M.paired_difference([2.0], [1.0]).se)
    with pytest.raises(ValueError):
        M.paired_difference([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        M.paired_difference([], [])


def test_win_rate_counts_ties_as_half():
    # prompt 1: A wins, prompt 2: tie, prompt 3: B wins -> (1 + 0.5 + 0) / 3
    assert M.win_rate([1.0, 2.0, 3.0], [0.0, 2.0, 5.0]) == pytest.approx(0.5)
    assert M.win_rate([3.0, 3.0], [1.0, 1.0]) == 1.0
    assert M.win_rate([0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]) == pytest.approx(0.625)
    assert math.isnan(M.win_rate([], []))
    with pytest.raises(ValueError):
        M.win_rate([1.0], [1.0, 2.0])


def test_length_stats():
    stats = M.length_stats([3, 5, 10], [True, True, False])
    assert stats["length_mean"] == pytest.approx(6.0)
    assert stats["eos_rate"] == pytest.approx(2 / 3)


def test_distinct_n_pools_ngrams_over_responses():
    seqs = [["a", "b", "a"], ["a", "b"]]
    # unigrams a b a a b -> 2 unique / 5 ; bigrams (a,b) (b,a) (a,b) -> 2 unique / 3
    assert M.distinct_n(seqs, 1) == pytest.approx(2 / 5)
    assert M.distinct_n(seqs, 2) == pytest.approx(2 / 3)
    assert M.distinct_n([["x"]], 2) == 0.0


def test_bleu_matches_sacrebleu_and_is_100_on_identical_text():
    import sacrebleu

    hyps = ["the cat is on the mat today", "a quick brown fox jumps"]
    refs = ["the cat sat on the mat today", "the quick brown fox jumps"]
    assert M.bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert 0.0 < M.bleu(hyps, refs) < 100.0
    assert M.bleu(refs, refs) == pytest.approx(100.0)


def test_rouge_matches_hand_values_and_library():
    from rouge_score import rouge_scorer

    hyp, ref = "the cat ran", "the cat sat"
    # ROUGE-1: 2 of 3 words shared -> F 2/3; ROUGE-2: bigram "the cat" of 2 -> 1/2; ROUGE-L: LCS 2 -> 2/3
    scores = M.rouge([hyp, ref], [ref, ref])
    assert scores["rouge1"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert scores["rouge2"] == pytest.approx((1 / 2 + 1.0) / 2)
    assert scores["rougeL"] == pytest.approx((2 / 3 + 1.0) / 2)
    direct = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, hyp)["rougeL"].fmeasure
    assert M.rouge([hyp], [ref])["rougeL"] == pytest.approx(direct)
    assert M.rouge([ref], [ref]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}


def test_position_kl_matches_hand_computed_value():
    # p = (0.5, 0.5), q = (0.25, 0.75): KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln 2 + 0.5 ln(2/3) = 0.14384
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.3, 0.7]]))
    ref = torch.log(torch.tensor([[0.25, 0.75], [0.3, 0.7]]))
    kl = M.position_kl(logits, ref)
    assert kl.tolist() == pytest.approx([0.5 * math.log(2) + 0.5 * math.log(2 / 3), 0.0], abs=1e-6)
