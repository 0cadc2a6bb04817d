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


def test_paired_difference_mean_and_standard_error_by_hand():
    # differences 1, 0, 2: mean 1; sample sd sqrt(((0)^2 + (-1)^2 + 1^2) / 2) = 1; se = 1 / sqrt(3)
    got = M.paired_difference([1.0, 2.0, 3.0], [0.0, 2.0, 1.0])
    assert got["mean"] == pytest.approx(1.0) and got["se"] == pytest.approx(1 / 3 ** 0.5)
    assert math.isnan(M.paired_difference([2.0], [1.0])["se"])
    with pytest.raises(ValueError):
        M.paired_difference([1.0], [1.0, 2.0])


def test_win_rate_counts_ties_as_half():
    # prompt 1: A wins, prompt 2: tie, prompt 3: B wins -> (1 + 0.5 + 0) / 3
    assert M.win_rate([1.0, 2.0, 3.0], [0.0, 2.0, 5.0]) == pytest.approx(0.5)
    assert M.win_rate([3.0, 3.0], [1.0, 1.0]) == 1.0
    assert M.win_rate([0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]) == pytest.approx(0.625)
    with pytest.raises(ValueError):
        M.win_rate([1.0], [1.0, 2.0])


def test_sequence_kl_sums_masked_token_differences():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # row 0: 0.5 + (-1.0) = -0.5 ; row 1: 0.5 + 0.5 = 1.0 (the masked -9 is ignored)
    kl = M.sequence_kl(logp, ref, mask)
    assert kl.tolist() == pytest.approx([-0.5, 1.0])
    assert kl.mean().item() == pytest.approx(0.25)


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
