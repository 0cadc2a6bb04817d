"""`chatrl feedback leaderboard`: which served model version people prefer, from the stored choices.

A comparison is a pair event whose two replies were written by different model versions (an arena choice, or a
regenerate choice across a reload); the same user's later choice between the same two replies replaces the earlier
one (as in `export`). Two rankings:

- Bradley-Terry: P(i beats j) = sigmoid(s_i - s_j), strengths fitted by maximum likelihood with Newton's method
  (step halving keeps every step uphill) and a ridge prior (lambda/2) * sum(s^2), i.e. s ~ N(0, 1/lambda), so a
  model that won every comparison gets a finite strength. Standard errors from the Hessian: the covariance is the
  inverse of the negative Hessian of the penalised log-likelihood at the optimum (observed information plus the
  prior; its pseudo-inverse without a prior), projected onto centred strengths (sum 0, as the fit's): the common
  level, which no comparison measures, is no part of a strength's uncertainty.
  Shown on the Elo scale too: 1000 + 400 / ln(10) * s.
- Elo: online updates (K, start 1000) in the order the choices were made, with a 95% interval from a seeded
  bootstrap over comparisons (resampled with replacement, replayed in their original order).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select

from chatrl.feedback.db import Database, Message
from chatrl.feedback.export import Filters, _events, _latest

ELO_SCALE = 400 / math.log(10)  # Elo points per unit of Bradley-Terry strength
ELO_START = 1000.0


@dataclass(frozen=True)
class Comparison:
    winner: str  # model version
    loser: str


@dataclass
class BTFit:
    strengths: np.ndarray
    se: np.ndarray


def comparisons(db: Database, filters: Filters | None = None) -> list[Comparison]:
    """The choices between replies of two different model versions, oldest first (with `filters` as in export)."""
    out = []
    with db.session() as s:
        for event in _latest(_events(s, ("pair",), filters or Filters())):
            chosen, rejected = s.get(Message, event.chosen_id), s.get(Message, event.rejected_id)
            if chosen.model_version and rejected.model_version and chosen.model_version != rejected.model_version:
                out.append(Comparison(chosen.model_version, rejected.model_version))
    return out


def model_names(db: Database, versions: list[str]) -> dict[str, str]:
    """The name(s) each version was served under, e.g. {"3fa9...": "new"}."""
    with db.session() as s:
        rows = s.execute(select(Message.model_version, Message.model_name).distinct()
                         .where(Message.model_version.in_(versions))).all()
    names: dict[str, set[str]] = {}
    for version, name in rows:
        names.setdefault(version, set()).add(name or "?")
    return {v: ", ".join(sorted(names.get(v, {"?"}))) for v in versions}


def _index(items: list[Comparison]) -> tuple[list[str], np.ndarray, np.ndarray]:
    players = sorted({c.winner for c in items} | {c.loser for c in items})
    at = {p: i for i, p in enumerate(players)}
    return players, np.array([at[c.winner] for c in items], int), np.array([at[c.loser] for c in items], int)


def _loglik(s: np.ndarray, w: np.ndarray, lo: np.ndarray, prior: float) -> float:
    return float(-np.logaddexp(0.0, -(s[w] - s[lo])).sum() - 0.5 * prior * (s @ s))


def fit_bradley_terry(winners: np.ndarray, losers: np.ndarray, n: int, prior: float = 0.1,
                      max_iter: int = 100, tol: float = 1e-10) -> BTFit:
    """Penalised-MLE Bradley-Terry strengths of `n` players from comparisons winners[k] beat losers[k]."""
    s = np.zeros(n)
    for _ in range(max_iter):
        p_win = 1 / (1 + np.exp(-(s[winners] - s[losers])))
        grad = np.bincount(winners, 1 - p_win, n) - np.bincount(losers, 1 - p_win, n) - prior * s
        info = _information(winners, losers, p_win, n, prior)
        step = np.linalg.pinv(info) @ grad  # without a prior, the step that keeps the sum of strengths
        before, scale = _loglik(s, winners, losers, prior), 1.0
        while _loglik(s + scale * step, winners, losers, prior) < before - 1e-12 and scale > 1e-6:
            scale /= 2  # Newton can overshoot far from the optimum: halve until the step goes uphill
        s = s + scale * step
        if np.abs(scale * step).max() < tol:
            break
    if prior == 0:
        s = s - s.mean()
    p_win = 1 / (1 + np.exp(-(s[winners] - s[losers])))
    centre = np.eye(n) - 1 / n
    cov = centre @ np.linalg.pinv(_information(winners, losers, p_win, n, prior)) @ centre
    return BTFit(s, np.sqrt(np.clip(np.diag(cov), 0, None)))


def _information(winners: np.ndarray, losers: np.ndarray, p_win: np.ndarray, n: int, prior: float) -> np.ndarray:
    """Minus the Hessian of the penalised log-likelihood: a weighted graph Laplacian plus prior * I."""
    h = p_win * (1 - p_win)
    info = prior * np.eye(n)
    np.add.at(info, (winners, winners), h)
    np.add.at(info, (losers, losers), h)
    np.add.at(info, (winners, losers), -h)
    np.add.at(info, (losers, winners), -h)
    return info


def elo(winners: np.ndarray, losers: np.ndarray, n: int, k: float = 32.0) -> np.ndarray:
    """Online Elo ratings after the comparisons in order, everyone starting at 1000."""
    r = np.full(n, ELO_START)
    for w, lo in zip(winners, losers, strict=True):
        expected = 1 / (1 + 10 ** ((r[lo] - r[w]) / 400))
        r[w] += k * (1 - expected)
        r[lo] -= k * (1 - expected)
    return r


def elo_interval(winners: np.ndarray, losers: np.ndarray, n: int, k: float, rounds: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """2.5% and 97.5% percentiles of Elo over `rounds` bootstrap resamples of the comparisons."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(rounds):
        pick = np.sort(rng.integers(0, len(winners), len(winners)))  # resampled, kept in their original order
        samples.append(elo(winners[pick], losers[pick], n, k))
    return np.percentile(samples, 2.5, axis=0), np.percentile(samples, 97.5, axis=0)


def leaderboard(items: list[Comparison], prior: float = 0.1, k: float = 32.0, rounds: int = 200,
                seed: int = 0) -> list[dict]:
    """One row per model version, strongest (Bradley-Terry) first."""
    if not items:
        return []
    players, w, lo = _index(items)
    fit = fit_bradley_terry(w, lo, len(players), prior)
    ratings = elo(w, lo, len(players), k)
    low, high = elo_interval(w, lo, len(players), k, rounds, seed)
    wins, games = Counter(w.tolist()), Counter(w.tolist()) + Counter(lo.tolist())
    rows = [{"model_version": p, "comparisons": games[i], "wins": wins[i], "bt": float(fit.strengths[i]),
             "bt_se": float(fit.se[i]), "bt_elo": ELO_START + ELO_SCALE * float(fit.strengths[i]),
             "elo": float(ratings[i]), "elo_low": float(low[i]), "elo_high": float(high[i])}
            for i, p in enumerate(players)]
    return sorted(rows, key=lambda r: -r["bt"])
