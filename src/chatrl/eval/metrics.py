"""Evaluation metrics as pure functions (no models, no I/O).

Each takes plain Python lists or tensors and returns floats, so they are easy to test by hand and to reuse from
the PPO step's logging. BLEU and ROUGE call the reference libraries (sacrebleu, rouge-score) on purpose: a
home-made BLEU silently disagrees with published numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def score_stats(scores: Sequence[float]) -> dict[str, float]:
    """Mean and population std of reward scores (std over the N values, divisor N)."""
    if not scores:
        return {"mean": float("nan"), "std": float("nan")}
    n = len(scores)
    mean = sum(scores) / n
    var = sum((s - mean) ** 2 for s in scores) / n
    return {"mean": mean, "std": math.sqrt(var)}


def mean_se(values: Sequence[float]) -> float:
    """Standard error of the mean of `values`: sample std (divisor n - 1) / sqrt(n); nan for fewer than 2 values
    (one value says nothing about its spread)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def proportion_se(p: float, n: int) -> float:
    """Standard error of a proportion p measured on n independent trials: sqrt(p (1 - p) / n); nan for n = 0."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 else float("nan")


@dataclass(frozen=True)
class PairedDifference:
    """New against baseline on the same items (prompts, tasks): the mean of new_i - baseline_i (positive = the new
    model scored higher), its standard error, and how often the new one won, lost or tied."""

    mean: float
    se: float
    wins: int
    losses: int
    ties: int

    @property
    def win_rate(self) -> float:
        """Share of items the new model won, a tie counting as half a win."""
        return (self.wins + 0.5 * self.ties) / (self.wins + self.losses + self.ties)


def paired_difference(new: Sequence[float], baseline: Sequence[float]) -> PairedDifference:
    """The one sign convention of every comparison in chatrl: new minus baseline, item by item. Since both answered
    the same items, the s.e. of the per-item differences is the honest measure of "clearly better" (booleans count
    as 0/1, e.g. task solved)."""
    if len(new) != len(baseline) or not new:
        raise ValueError(f"paired_difference needs one score per item for both models ({len(new)} vs "
                         f"{len(baseline)})")
    diffs = [float(a) - float(b) for a, b in zip(new, baseline, strict=True)]
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return PairedDifference(sum(diffs) / len(diffs), mean_se(diffs), wins, losses, len(diffs) - wins - losses)


def win_rate(new: Sequence[float], baseline: Sequence[float]) -> float:
    """Fraction of prompts where the new model's reward beats the baseline's (same prompt, same index); a tie counts
    as half a win. nan for no prompts."""
    if len(new) != len(baseline):
        raise ValueError(f"win_rate needs one score per prompt for both models ({len(new)} != {len(baseline)})")
    return paired_difference(new, baseline).win_rate if new else float("nan")


def position_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || q) of the next-token distributions at each position: sum_v p_v (log p_v - log q_v).

    logits, ref_logits: [..., V] -> [...] (>= 0; 0 where the distributions agree)."""
    logp = torch.log_softmax(logits.float(), -1)
    ref_logp = torch.log_softmax(ref_logits.float(), -1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def length_stats(lengths: Sequence[int], ended_with_eos: Sequence[bool]) -> dict[str, float]:
    """Mean response length (tokens) and the fraction of responses that stopped on EOS (not on the length cap)."""
    if len(lengths) != len(ended_with_eos):
        raise ValueError("length_stats needs one EOS flag per length")
    if not lengths:
        return {"length_mean": float("nan"), "eos_rate": float("nan")}
    return {"length_mean": sum(lengths) / len(lengths), "eos_rate": sum(map(bool, ended_with_eos)) / len(lengths)}


def distinct_n(sequences: Sequence[Sequence[object]], n: int) -> float:
    """distinct-n (Li et al. 2016): unique n-grams / total n-grams, pooled over all responses.

    `sequences` are already-split tokens (words or ids). Returns 0.0 when there is no n-gram at all.
    """
    grams = [tuple(seq[i:i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of hypotheses against one reference each, with sacrebleu's default settings."""
    import sacrebleu  # lazy: only when references are given

    if len(hypotheses) != len(references):
        raise ValueError("bleu needs one reference per hypothesis")
    if not hypotheses:
        return float("nan")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (0-1) over pairs, from Google's rouge-score (with the Porter stemmer)."""
    from rouge_score import rouge_scorer  # lazy: only when references are given

    if len(hypotheses) != len(references):
        raise ValueError("rouge needs one reference per hypothesis")
    if not hypotheses:
        return {k: float("nan") for k in ROUGE_TYPES}
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hypotheses, references, strict=True):
        scores = scorer.score(ref, hyp)  # (target, prediction)
        for k in ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
    return {k: v / len(hypotheses) for k, v in totals.items()}
