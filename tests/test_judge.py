"""The LLM judge (chatrl.judge) against a fake OpenAI-compatible server in a thread: scores parsed and scaled,
the cache answers a rerun without a request, retries back off exponentially, timeouts and HTTP errors follow the
failure policy (one line, or skipped groups counted), concurrency is bounded, pairwise preferences become scores."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from chatrl.config_offline import RFTConfig
from chatrl.config_rl import GRPOConfig
from chatrl.config_sources import JudgeConfig
from chatrl.errors import ChatrlError
from chatrl.judge import DEFAULT_RUBRIC, Judge, load_rubric, parse_preference, parse_score
from fake_judge import FakeJudge, Hang, Status

RUBRIC = "<<{prompt}>>[[{reply}]]"
PAIR_RUBRIC = "<<{prompt}>>A[[{reply_a}]]B[[{reply_b}]]"
PROMPT = [{"role": "user", "content": "Say something."}]


def reply_of(text: str) -> str:
    return re.search(r"\[\[(.*?)\]\]", text, re.DOTALL).group(1)


def by_length(text: str) -> str:
    """Score 1 + len(reply) % 10: 'a' -> 2, 'bbb' -> 4, 'ccccc' -> 6."""
    return f"Some thoughts first.\nScore: {1 + len(reply_of(text)) % 10}"


def make(url: str, tmp_path: Path, **kw) -> Judge:
    settings = dict(base_url=url, model="fake-judge", rubric=RUBRIC, cache=str(tmp_path / "cache.sqlite"),
                    retries=0, backoff_s=0.01, timeout_s=5.0)
    return Judge(JudgeConfig(**{**settings, **kw}), tmp_path)


def test_parse_score_and_preference() -> None:
    assert parse_score("Score: 7", 1, 10) == pytest.approx(6 / 9)
    assert parse_score("I thought hard. **Score:** 10", 1, 10) == 1.0
    assert parse_score("Score: 3\nscore = 5", 1, 10) == pytest.approx(4 / 9)  # the last verdict counts
    assert parse_score(" 4/10 ", 1, 10) == pytest.approx(3 / 9) and parse_score("0.5", 0, 1) == 0.5
    for bad in ("great reply", "I give it 7 points", "Score: 11", "Score: 0"):
        with pytest.raises(ValueError):
            parse_score(bad, 1, 10)
    assert [parse_preference(a) for a in ("Winner: A", "winner: b.", "B", "Winner: tie")] == [1.0, 0.0, 0.0, 0.5]
    with pytest.raises(ValueError):
        parse_preference("both are fine")


def test_rubric_file_inline_default_and_missing_placeholders(tmp_path: Path) -> None:
    assert load_rubric(None, "score") == DEFAULT_RUBRIC
    path = tmp_path / "rubric.txt"
    path.write_text("Q: {prompt}\nA: {reply}\nScore 1-10.")
    assert load_rubric(str(path), "score") == path.read_text()
    with pytest.raises(ChatrlError, match=r"lacks \{reply\}"):
        load_rubric("Rate {prompt}", "score")
    with pytest.raises(ChatrlError, match=r"lacks \{reply_a\}, \{reply_b\}"):
        load_rubric(str(path), "pairwise")


def test_scores_are_parsed_scaled_and_a_rerun_hits_the_cache(tmp_path: Path) -> None:
    with FakeJudge(by_length) as server:
        judge = make(server.url, tmp_path)
        out = judge.score([PROMPT] * 4, ["a", "bbb", "ccccc", "a"], group_size=2)
        assert out.scores.tolist() == pytest.approx([1 / 9, 3 / 9, 5 / 9, 1 / 9])
        assert out.kept.all() and len(server.requests) == 3  # the duplicate (same prompt and reply) asked once
        assert reply_of(server.requests[0].text) in {"a", "bbb", "ccccc"}
        assert server.requests[0].text.startswith("<<Say something.>>")
        metrics = judge.take_metrics()
        assert (metrics["judge/requests"], metrics["judge/cache_hits"], metrics["judge/errors"]) == (3, 0, 0)
        assert 0 < metrics["judge/latency_s"] < 5
        rerun = make(server.url, tmp_path)  # a new judge on the same cache file: no request at all
        again = rerun.score([PROMPT] * 4, ["a", "bbb", "ccccc", "a"], group_size=2)
        assert again.scores.tolist() == out.scores.tolist() and len(server.requests) == 3
        metrics = rerun.take_metrics()
        assert (metrics["judge/requests"], metrics["judge/cache_hits"], metrics["judge/latency_s"]) == (0, 4, 0.0)
        other = make(server.url, tmp_path, rubric="{prompt} -> [[{reply}]]")  # another rubric: another key
        other.score([PROMPT], ["a"])
        assert len(server.requests) == 4


def test_garbage_answer_stops_with_one_line_naming_the_endpoint(tmp_path: Path) -> None:
    with FakeJudge(lambda text: "what a lovely\nday") as server:
        judge = make(server.url, tmp_path)
        with pytest.raises(ChatrlError) as err:
            judge.score([PROMPT] * 2, ["x", "y"], group_size=2)
    message = str(err.value)
    assert "\n" not in message and server.url in message and "fake-judge" in message
    assert "answered 'what a lovely\\nday', which holds no score" in message and "2 of 2" in message


def test_skip_drops_the_whole_group_and_counts_it(tmp_path: Path) -> None:
    # replies starting with '?' get garbage: group 0 (rows 0-1) loses one score, so both rows go; group 1 stays
    def answer(text: str) -> str:
        return "no idea" if reply_of(text).startswith("?") else by_length(text)

    with FakeJudge(answer) as server:
        judge = make(server.url, tmp_path, on_error="skip")
        out = judge.score([PROMPT] * 4, ["?x", "bbb", "a", "ccccc"], group_size=2)
        assert out.kept.tolist() == [False, False, True, True]
        assert out.scores.tolist() == pytest.approx([0, 0, 1 / 9, 5 / 9])
        metrics = judge.take_metrics()
        assert (metrics["judge/skipped"], metrics["judge/errors"], metrics["judge/requests"]) == (2, 1, 4)
        judge.score([PROMPT] * 2, ["?x", "bbb"], group_size=2)  # failures are not cached: asked again
        assert [reply_of(t) for t in server.texts()[4:]] == ["?x"]


def test_http_500_is_retried_with_exponential_backoff(tmp_path: Path) -> None:
    with FakeJudge(lambda text: Status(500)) as server:
        judge = make(server.url, tmp_path, retries=3, backoff_s=0.2)
        with pytest.raises(ChatrlError, match="answered HTTP 500: .*the judge is down.*4 attempts"):
            judge.score([PROMPT], ["a"])
    times = [r.time for r in server.requests]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) == 4  # 1 + 3 retries
    for gap, wait in zip(gaps, [0.2, 0.4, 0.8], strict=True):  # backoff_s * 2^k, plus a request's round trip
        assert wait <= gap < wait + 0.15, gaps


def test_transient_500s_then_an_answer(tmp_path: Path) -> None:
    answers = iter([Status(503), Status(500), "Score: 10"])
    with FakeJudge(lambda text: next(answers)) as server:
        judge = make(server.url, tmp_path, retries=2)
        assert judge.score([PROMPT], ["a"]).scores.tolist() == [1.0]
        assert len(server.requests) == 3 and judge.take_metrics()["judge/requests"] == 3


def test_a_hanging_judge_times_out_each_attempt(tmp_path: Path) -> None:
    with FakeJudge(lambda text: Hang(5.0)) as server:
        judge = make(server.url, tmp_path, timeout_s=0.3, retries=1, on_error="skip")
        start = time.monotonic()
        out = judge.score([PROMPT] * 2, ["a", "b"], group_size=2)
        elapsed = time.monotonic() - start
        assert out.kept.tolist() == [False, False] and len(server.requests) == 4  # 2 replies x 2 attempts
        assert 0.6 <= elapsed < 3.0, elapsed  # two 0.3 s attempts (the replies in parallel), not the 5 s hang
        judge = make(server.url, tmp_path, timeout_s=0.3, retries=0)
        with pytest.raises(ChatrlError, match=r"gave no answer within timeout_s=0\.3 \(1 attempts\)"):
            judge.score([PROMPT], ["a"])


def test_a_refused_request_stops_at_once_and_the_key_is_sent(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-judge")
    with FakeJudge(lambda text: Status(401, '{"error": {"message": "bad key"}}')) as server:
        judge = make(server.url, tmp_path, retries=3, on_error="skip", api_key_env="JUDGE_TEST_KEY")
        with pytest.raises(ChatrlError, match="answered HTTP 401: .*bad key.*check reward.judge.base_url"):
            judge.score([PROMPT], ["a"])
    assert len(server.requests) == 1 and server.requests[0].headers["Authorization"] == "Bearer sk-judge"
    monkeypatch.delenv("JUDGE_TEST_KEY")
    with pytest.raises(ChatrlError, match="api_key_env=JUDGE_TEST_KEY: that environment variable is not set"):
        make(server.url, tmp_path, api_key_env="JUDGE_TEST_KEY")


def test_concurrency_bounds_the_requests_in_flight(tmp_path: Path) -> None:
    with FakeJudge(by_length, delay=0.2) as server:
        make(server.url, tmp_path, concurrency=3, cache="off").score([PROMPT] * 9, [f"r{i}" for i in range(9)])
    assert len(server.requests) == 9 and server.max_in_flight == 3


def test_pairwise_preferences_become_win_shares(tmp_path: Path) -> None:
    # the longer reply wins, equal lengths tie; one group of 5 with swap: 20 comparisons, each reply plays 8
    def longer(text: str) -> str:
        a, b = re.findall(r"\[\[(.*?)\]\]", text)
        return "Winner: tie" if len(a) == len(b) else f"Winner: {'A' if len(a) > len(b) else 'B'}"

    with FakeJudge(longer) as server:
        judge = make(server.url, tmp_path, mode="pairwise", rubric=PAIR_RUBRIC)
        out = judge.score([PROMPT] * 5, ["bb", "a", "ccc", "x", "y"], group_size=5)
        assert len(server.requests) == 5 * 4
        # wins out of 8 games: bb beats a, x, y (2 games each) = 6; a ties x, y (1 + 1) = 2; ccc wins all = 8;
        # x: ties a (1), ties y (1) = 2; y likewise 2
        assert out.scores.tolist() == pytest.approx([6 / 8, 2 / 8, 1.0, 2 / 8, 2 / 8])


def test_config_rules() -> None:
    def cfg(**judge) -> GRPOConfig:
        c = GRPOConfig()
        c.env.name = "chat"
        for k, v in judge.items():
            setattr(c.reward.judge, k, v)
        return c

    cfg(base_url="http://x/v1", model="m").check()  # a judge alone is a reward source
    with pytest.raises(ChatrlError, match="reward.judge.model is empty"):
        cfg(base_url="http://x/v1").check()
    c = cfg(base_url="http://x/v1", model="m", mode="pairwise")
    c.rollout.samples_per_prompt = 1
    c.grpo.advantage = "reinforce_pp"
    with pytest.raises(ChatrlError, match="pairwise .*samples_per_prompt >= 2"):
        c.check()
    with pytest.raises(ChatrlError, match="score_max=1.0 must be > score_min=1.0"):
        cfg(base_url="http://x/v1", model="m", score_max=1.0).check()
    rft = RFTConfig()
    rft.reward.judge.base_url, rft.reward.judge.model = "http://x/v1", "m"
    with pytest.raises(ChatrlError, match="reward.judge is not supported by chatrl rft"):  # not silently ignored
        rft.check()
