"""Evaluation metrics as pure functions (no models, no I/O).

Each takes plain Python lists or tensors and returns floats, so they are easy to test by hand and to reuse from
the PPO step's logging. BLEU and ROUGE call the reference libraries (sacrebleu, rouge-score) on purpose: a
home-made BLEU silently disagrees with published numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def score_stats(scores: Sequence[float]) -> dict[str, float]:
    """Mean and population std of reward scores (std over the N values, divisor N)."""
    if not scores:
        return {"mean": float("nan"), "std": float("nan")}
    n = len(scores)
    mean = sum(scores) / n
    var = sum((s - mean) ** 2 for s in scores) / n
    return {"mean": mean, "std": math.sqrt(var)}


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Fraction of prompts where A's reward beats B's (same prompt, same index); a tie counts as half a win."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"win_rate needs one score per prompt for both models ({len(scores_a)} != {len(scores_b)})")
    if not scores_a:
        return float("nan")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b, strict=True))
    return wins / len(scores_a)


def paired_difference(scores_a: Sequence[float], scores_b: Sequence[float]) -> dict[str, float]:
    """Mean of a_i - b_i over the same prompts and its standard error (sample std with n - 1, / sqrt(n)):
    how clearly A beats B, since both answered the same prompts. se is nan for fewer than 2 prompts."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(f"paired_difference needs one score per prompt for both models "
                         f"({len(scores_a)} vs {len(scores_b)})")
    diffs = [a - b for a, b in zip(scores_a, scores_b, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    return {"mean": mean, "se": se}


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL estimate: sum over response tokens of (logp_model - logp_ref).

    logp, ref_logp: B x T log-probs of the sampled tokens under the model and the reference.
    mask: B x T, 1 on response tokens (including a final EOS), 0 on prompt/padding.
    Returns a B tensor; its mean over sequences is the reported KL (a Monte Carlo estimate of KL(model || ref)
    when the responses were sampled from the model).
    """
    mask = mask.to(logp.dtype)
    return ((logp - ref_logp) * mask).sum(dim=-1)


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
