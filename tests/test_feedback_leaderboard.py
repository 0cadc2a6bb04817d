"""`chatrl feedback leaderboard`: Bradley-Terry (penalised MLE, Hessian standard errors) and Elo against hand-computed
numbers, interval coverage on simulated choices, and the comparisons read from a feedback database."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from chatrl.feedback.db import open_db
from chatrl.feedback.leaderboard import Comparison, comparisons, elo, fit_bradley_terry, leaderboard
from chatrl.feedback.store import FeedbackStore, Reply
from helpers import run_cli


def _games(*results: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(winner, loser, times) -> the comparison arrays."""
    w = [a for a, _, times in results for _ in range(times)]
    lo = [b for _, b, times in results for _ in range(times)]
    return np.array(w), np.array(lo)


def test_two_models_three_wins_to_one_is_log3_apart_with_hand_computed_se():
    w, lo = _games((0, 1, 3), (1, 0, 1))
    fit = fit_bradley_terry(w, lo, 2, prior=0.0)
    assert fit.strengths[0] - fit.strengths[1] == pytest.approx(math.log(3), abs=1e-9)
    assert fit.strengths.sum() == pytest.approx(0, abs=1e-12)  # centred without a prior
    # information = 4 comparisons * p(1-p) = 4 * 3/16 = 3/4 on the Laplacian [[1,-1],[-1,1]]: its pseudo-inverse
    # gives var(s_a) = 1 / (4 * 3/4) = 1/3
    assert fit.se == pytest.approx([math.sqrt(1 / 3)] * 2, abs=1e-9)


def test_ridge_prior_shrinks_and_keeps_one_sided_data_finite():
    w, lo = _games((0, 1, 3), (1, 0, 1))
    fit = fit_bradley_terry(w, lo, 2, prior=1.0)
    d = fit.strengths[0] - fit.strengths[1]
    # stationarity by hand: 3 wins * (1 - sigmoid(d)) - 1 loss * sigmoid(d) = prior * d / 2, i.e. 3 - 4 sigmoid(d)
    assert 3 - 4 / (1 + math.exp(-d)) == pytest.approx(1.0 * d / 2, abs=1e-9)
    assert 0 < d < math.log(3)
    # s.e. of a centred strength: information = prior * I + 4 p(1-p) [[1,-1],[-1,1]]; d's variance is
    # 2 / (prior + 2 * 4 p(1-p)) and s_a = d / 2
    h = 4 * math.exp(-d) / (1 + math.exp(-d)) ** 2
    assert fit.se == pytest.approx([math.sqrt(1 / (2 * (1.0 + 2 * h)))] * 2, abs=1e-9)
    sweep = fit_bradley_terry(*_games((0, 1, 5)), 2, prior=0.1)  # 5-0: the plain MLE is infinite
    assert np.isfinite(sweep.strengths).all() and 0 < sweep.strengths[0] < 10 and np.isfinite(sweep.se).all()


def test_three_models_match_the_hand_solved_mle():
    # A>B 3-0, B>C 3-0, A>C 3-2. Strengths (log 2, 0, -log 2) solve the score equations (wins = expected wins):
    # A: 3 * 2/3 + 5 * 4/5 = 6 = 3 + 3;  B: 3 * 1/3 + 3 * 2/3 = 3 = 0 + 3;  C: 3 * 1/3 + 5 * 1/5 = 2 = 0 + 2
    w, lo = _games((0, 1, 3), (1, 2, 3), (0, 2, 3), (2, 0, 2))
    fit = fit_bradley_terry(w, lo, 3, prior=0.0)
    assert fit.strengths == pytest.approx([math.log(2), 0.0, -math.log(2)], abs=1e-8)


def test_elo_updates_by_hand():
    r = elo(np.array([0]), np.array([1]), 2, k=32)
    assert r == pytest.approx([1016, 984])
    r = elo(np.array([0, 1]), np.array([1, 0]), 2, k=32)
    # B's expected score at 984 vs 1016: 1 / (1 + 10^(32/400)) = 0.4540781; it gains 32 * 0.5459219 = 17.469502
    assert r == pytest.approx([1016 - 17.469502, 984 + 17.469502], abs=1e-5)


def test_intervals_cover_the_truth_on_simulated_choices():
    rng = np.random.default_rng(0)
    truth = np.array([0.8, 0.0, -0.8])
    pairs = rng.integers(0, 3, size=(3000, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]][:900]
    first_wins = rng.random(len(pairs)) < 1 / (1 + np.exp(-(truth[pairs[:, 0]] - truth[pairs[:, 1]])))
    w = np.where(first_wins, pairs[:, 0], pairs[:, 1])
    lo = np.where(first_wins, pairs[:, 1], pairs[:, 0])
    fit = fit_bradley_terry(w, lo, 3, prior=0.0)
    assert (np.abs(fit.strengths - truth) < 1.96 * fit.se).all()
    assert (fit.se < 0.1).all()  # 600 comparisons per model pin each strength to about +-0.06
    items = [Comparison(f"v{a}", f"v{b}") for a, b in zip(w, lo, strict=True)]
    rows = leaderboard(items, prior=0.0, rounds=50, seed=1)
    assert [r["model_version"] for r in rows] == ["v0", "v1", "v2"]
    assert all(r["elo_low"] < r["elo"] < r["elo_high"] for r in rows)
    assert rows[0]["bt_elo"] - rows[2]["bt_elo"] == pytest.approx(400 / math.log(10) * (rows[0]["bt"] - rows[2]["bt"]))
    assert leaderboard(items, prior=0.0, rounds=50, seed=1) == rows  # seeded: the same intervals again


def _reply_pair(store: FeedbackStore, user, prompt: str, a: tuple[str, str], b: tuple[str, str]) -> tuple:
    replies = [Reply(f"chatcmpl-{prompt}-{i}", f"{name} says {prompt}", "stop", model_name=name, version=version)
               for i, (name, version) in enumerate((a, b))]
    done = store.record_completion(user, [{"role": "user", "content": prompt}], replies, model_name="arena",
                                   version="arena", sampling={})
    return done.prompt_id, replies[0].completion_id, replies[1].completion_id


def test_comparisons_from_the_database_and_the_cli_table(tmp_path: Path):
    db_path = tmp_path / "chat.db"
    store = FeedbackStore(open_db(db_path))
    user = store.local_user()
    for i in range(3):  # new beats old three times
        prompt, new, old = _reply_pair(store, user, f"p{i}", ("new", "v-new"), ("old", "v-old"))
        store.add_pair(user, prompt, new, old)
    prompt, new, old = _reply_pair(store, user, "changed", ("new", "v-new"), ("old", "v-old"))
    store.add_pair(user, prompt, new, old)
    store.add_pair(user, prompt, old, new)  # a changed mind: only this later choice counts
    prompt, x, y = _reply_pair(store, user, "same", ("new", "v-new"), ("new", "v-new"))
    store.add_pair(user, prompt, x, y)  # one version against itself says nothing about the ranking
    found = comparisons(store.db)
    assert found == [Comparison("v-new", "v-old")] * 3 + [Comparison("v-old", "v-new")]

    done = run_cli("feedback", "leaderboard", "--db", str(db_path), "--prior", "0", "--rounds", "20", timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "v-new" in line or "v-old" in line]
    assert "new" in lines[0] and "v-new" in lines[0] and "v-old" in lines[1]  # ranked: new first
    half = math.log(3) / 2  # 3 wins to 1 -> log 3 apart, centred
    assert f"+{half:.3f}" in lines[0] and f"-{half:.3f}" in lines[1]
    empty = run_cli("feedback", "leaderboard", "--db", str(tmp_path / "empty.db"), timeout=120)
    assert empty.returncode != 0 and "no choices" in empty.stderr and "Traceback" not in empty.stderr
