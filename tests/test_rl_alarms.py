"""Alarms of an RL run (steps/rl_alarms.py) on hand-made metrics rows: each fires on the row that should raise it,
stays quiet on the ones that should not, and is written to alarms.jsonl once per window."""

from __future__ import annotations

import math

from chatrl.steps.rl_alarms import STALE_LOGPROB_GAP, Alarms, check_row, read_alarms, reward_flat


def _rows(rewards: list[float], kls: list[float]) -> list[dict[str, float]]:
    return [{"reward_mean": r, "kl": k} for r, k in zip(rewards, kls, strict=True)]


def test_reward_flat_fires_when_kl_grows_and_reward_does_not_rise() -> None:
    # earlier window rewards 0.4, 0.6, 0.5, 0.5: mean 0.5, sd 0.0816, s.e. 0.0408; the last window's mean 0.52
    rows = _rows([0.4, 0.6, 0.5, 0.5, 0.5, 0.54, 0.52, 0.52], [0.2, 0.3, 0.3, 0.2, 0.8, 1.0, 1.2, 1.0])
    msg = reward_flat(rows, window=4)
    assert msg is not None and "+0.020" in msg and "0.041" in msg and "0.250 -> 1.000" in msg
    # the same KL growth with a reward rise of 0.1 (> 1 s.e.): learning, no alarm
    assert reward_flat(_rows([0.4, 0.6, 0.5, 0.5, 0.6, 0.6, 0.6, 0.6], [0.2, 0.3, 0.3, 0.2, 0.8, 1.0, 1.2, 1.0]), 4) is None
    # a flat reward with a flat KL (x1.2 < x1.5): nothing moves, no alarm either
    assert reward_flat(_rows([0.4, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0, 1.2, 1.2, 1.2, 1.2]), 4) is None
    assert reward_flat(rows[:7], window=4) is None  # fewer than two windows


def test_row_alarms_nonfinite_tied_and_stale() -> None:
    kinds = lambda row: [a.kind for a in check_row(row, [], 5, 3)]  # noqa: E731
    assert kinds({"reward_mean": 0.1, "kl": 0.2, "zero_variance_groups": 0.5}) == []
    assert kinds({"reward_mean": math.nan, "kl": 0.2}) == ["nonfinite"]
    assert kinds({"reward_mean": 0.1, "kl": math.inf}) == ["nonfinite"]
    assert kinds({"reward_mean": 0.1, "kl": 0.1, "zero_variance_groups": 1.0}) == ["all_tied"]
    assert kinds({"reward_mean": 0.1, "kl": 0.1, "agreement/logprob_mean_abs_diff": 0.02}) == []  # bf16 rounding
    assert kinds({"reward_mean": 0.1, "kl": 0.1,
                  "agreement/logprob_mean_abs_diff": STALE_LOGPROB_GAP * 3}) == ["stale_rollout"]


def test_alarms_are_written_once_per_window(tmp_path, capsys) -> None:
    alarms = Alarms(tmp_path, window=3)
    tied = {"reward_mean": 0.0, "kl": 0.0, "zero_variance_groups": 1.0}
    fired = [len(alarms.check(step, dict(tied))) for step in range(1, 8)]
    assert fired == [1, 0, 0, 1, 0, 0, 1]  # steps 1, 4, 7
    assert [(a.step, a.kind) for a in read_alarms(tmp_path)] == [(1, "all_tied"), (4, "all_tied"), (7, "all_tied")]
    assert "ALARM [all_tied] iteration 4" in capsys.readouterr().err
    assert read_alarms(tmp_path / "nowhere") == []
