"""`chatrl env eval SPEC --base-url URL --model NAME`: an environment played against an OpenAI-compatible endpoint
(here `chatrl serve` on the tiny model, a real server subprocess, through the official `openai` client); success,
return and pass@k with standard errors, checked by hand."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatrl.envs import make_env
from chatrl.errors import ChatrlError
from chatrl.eval.endpoint_eval import connect, evaluate_endpoint
from helpers import run_cli
from server_processes import running

pytest.importorskip("openai")


@pytest.fixture(scope="module")
def chat_server() -> Iterator[str]:
    with running(["-m", "chatrl", "serve", "--model", "tiny-random", "--dtype", "fp32", "--port", "0",
                  "--model-name", "tiny"]) as url:
        yield url


def test_env_eval_against_chatrl_serve(chat_server: str, tmp_path: Path) -> None:
    # EvenTaskEnv solves tasks 0, 2, 4 of 0..5 whatever the model says: success 0.5 (s.e. sqrt(.25 / 6)), every
    # return 1 or 0 (s.e. of the mean: sample sd sqrt(0.3) / sqrt(6)), pass@2 also 0.5
    proc = run_cli("env", "eval", "rl_envs:EvenTaskEnv", "--base-url", f"{chat_server}/v1", "--model", "tiny",
                   "--episodes", "6", "--samples", "2", "--max-tokens", "4", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"tiny +success +50\.0% \(s\.e\. 20\.4%\) +pass@2 +50\.0% \(s\.e\. 20\.4%\) +return 0\.500 "
                     r"\(s\.e\. 0\.224\)", proc.stdout), proc.stdout
    result = json.loads((tmp_path / "eval_env.json").read_text())["models"]["tiny"]
    assert result["n_tasks"] == 6 and result["k"] == 2 and result["per_task"] == [True, False] * 3
    assert math.isclose(result["return_se"], math.sqrt(0.3 / 6))
    [first, *_] = result["examples"]
    assert [m["role"] for m in first["conversation"]] == ["user", "assistant"]  # the reply came from the server
    assert first["conversation"][0]["content"].startswith("Say a few words. (0)")


class ScriptedEndpoint:
    """Stands for a model: solves an arithmetic question greedily when its first operand is even, and when sampled
    only on the second sample (seed = task seed 1)."""

    model = "scripted"

    def reply(self, messages, temperature, seed):
        a, op, b = re.search(r"What is (\d+) ([-+*]) (\d+)\?", messages[-1]["content"]).groups()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        right = int(a) % 2 == 0 if temperature == 0 else seed == 1
        return f"The answer is {value if right else value + 1}."


def test_scores_are_the_hand_counted_ones() -> None:
    env = make_env("arithmetic")
    even = [env.problem_for("eval", t)[0] % 2 == 0 for t in range(10)]
    assert 0 < sum(even) < 10  # the greedy success rate is not trivially 0 or 1
    lines: list[str] = []
    score = evaluate_endpoint(ScriptedEndpoint(), "arithmetic", episodes=10, samples=3, progress=False,
                              log=lines.append)
    p = sum(even) / 10
    assert score.per_task == even and score.success == p and score.pass_k == 1.0  # sample 2 of 3 solves all
    assert math.isclose(score.success_se, math.sqrt(p * (1 - p) / 10)) and score.pass_k_se == 0.0
    assert score.mean_return == p and lines == [score.line("scripted")]
    assert score.examples[0]["conversation"][1]["role"] == "assistant"


def test_endpoint_errors_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("H20_NO_SUCH_KEY", raising=False)
    with pytest.raises(ChatrlError, match="--api-key-env H20_NO_SUCH_KEY: the environment variable is not set"):
        connect("http://127.0.0.1:9/v1", "m", "H20_NO_SUCH_KEY")
    endpoint = connect("http://127.0.0.1:9/v1", "m")  # nothing listens on port 9
    with pytest.raises(ChatrlError, match="the endpoint http://127.0.0.1:9/v1/ failed for model 'm': "
                                          "APIConnectionError") as err:
        evaluate_endpoint(endpoint, "arithmetic", episodes=1, samples=0, progress=False)
    assert "\n" not in str(err.value)


class Echo:
    """Replies with the number of messages it was sent."""

    model = "echo"

    def reply(self, messages, temperature, seed):
        return str(len(messages))


def test_multi_turn_episodes_send_the_conversation_so_far() -> None:
    # ThreeTurnEnv: turns 1 and 2 are answered "Turn k done, go on." with reward k, the third ends it with 10
    score = evaluate_endpoint(Echo(), "rl_envs:ThreeTurnEnv", episodes=2, samples=1, max_turns=3, progress=False,
                              log=lambda line: None)
    assert score.success == 1.0 and score.mean_return == 13.0 and score.pass_k == 1.0
    conversation = score.examples[0]["conversation"]
    assert [m["content"] for m in conversation if m["role"] == "assistant"] == ["1", "3", "5"]
    assert conversation[2] == {"role": "user", "content": "Turn 1 done, go on."}
    cut = evaluate_endpoint(Echo(), "rl_envs:ThreeTurnEnv", episodes=2, samples=0, max_turns=2, progress=False,
                            log=lambda line: None)
    assert cut.success == 0.0 and cut.mean_return == 3.0  # unfinished after 2 turns: 1 + 2, not a success
