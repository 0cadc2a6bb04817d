"""The LLM judge against `chatrl serve` running as a real server process on the tiny random model: its answers are
gibberish without a score, so the failure policy decides: on_error=error stops with one line naming the endpoint
and quoting what it answered; on_error=skip leaves the group out, counted."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from chatrl.config_sources import JudgeConfig
from chatrl.errors import ChatrlError
from chatrl.judge import DEFAULT_RUBRIC, Judge, fill
from helpers import REPO, cli_env

KEY = "sk-served-judge"
PROMPT = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def served(tiny_model_dir: str) -> Iterator[str]:
    """`chatrl serve --port 0` in a subprocess; yields its API URL (…/v1) once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "chatrl", "serve", "--model", tiny_model_dir, "--dtype", "fp32",
                             "--port", "0", "--api-key", KEY, "--model-name", "tiny-judge"], cwd=REPO,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # "chatrl serve: chat page at URL/  |  OpenAI API at URL/v1  (Ctrl-C ...)"
        assert "OpenAI API at " in line, line
        yield line.split("OpenAI API at ")[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(30)


def judge_for(url: str, tmp_path: Path, on_error: str) -> Judge:
    cfg = JudgeConfig(base_url=url, model="tiny-judge", api_key_env="CHATRL_TEST_JUDGE_KEY", max_tokens=8,
                      retries=0, timeout_s=60, on_error=on_error)
    return Judge(cfg, tmp_path)


def test_served_gibberish_stops_with_one_line_quoting_the_answer(served: str, tmp_path: Path,
                                                                 monkeypatch) -> None:
    monkeypatch.setenv("CHATRL_TEST_JUDGE_KEY", KEY)
    with pytest.raises(ChatrlError) as err:
        judge_for(served, tmp_path, "error").score([PROMPT], ["4"])
    # the same question asked directly: greedy (temperature 0), so the same answer the judge got
    client = openai.OpenAI(base_url=served, api_key=KEY, max_retries=0)
    text = fill(DEFAULT_RUBRIC, prompt="What is 2 + 2?", reply="4")
    answer = client.chat.completions.create(model="tiny-judge", messages=[{"role": "user", "content": text}],
                                            temperature=0.0, max_tokens=8).choices[0].message.content
    message = str(err.value)
    assert "\n" not in message and f"reward.judge at {served} (model tiny-judge)" in message
    assert f"answered {answer!r:.300}, which holds no score" in message, (answer, message)


def test_served_gibberish_is_skipped_and_counted(served: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CHATRL_TEST_JUDGE_KEY", KEY)
    judge = judge_for(served, tmp_path, "skip")
    out = judge.score([PROMPT] * 4, ["4", "5", "four", "22"], group_size=2)
    assert out.kept.tolist() == [False] * 4 and out.scores.tolist() == [0.0] * 4
    metrics = judge.take_metrics()
    assert (metrics["judge/skipped"], metrics["judge/errors"], metrics["judge/requests"]) == (4, 4, 4)
    assert metrics["judge/latency_s"] > 0


def test_a_wrong_key_stops_at_once(served: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CHATRL_TEST_JUDGE_KEY", "sk-wrong")
    with pytest.raises(ChatrlError, match=r"answered HTTP 401"):
        judge_for(served, tmp_path, "skip").score([PROMPT], ["4"])
