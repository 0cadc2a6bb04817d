"""OpenEnv both ways, over real loopback servers: `env.name=openenv:URL` plays a third-party OpenEnv server (built
only with openenv-core's helpers) through openenv-core's client, and `chatrl env serve` serves chatrl's environments
so that playing them remotely gives the same episodes as in-process."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatrl.envs import make_env
from chatrl.envs.check import check_env
from chatrl.errors import ChatrlError
from helpers import read_metrics, run_cli
from server_processes import running

pytest.importorskip("openenv.core")

WORD_KWARGS = {"action_field": "text", "observation_field": "prompt", "seed_from_task": True}
REPLIES = ["50", "I think 25.", "", "75", "12", "88", "3", "97", "60", "40"]


@pytest.fixture(scope="module")
def word_server() -> Iterator[str]:
    with running(["tests/openenv_word_server.py"]) as url:
        yield url


@pytest.fixture(scope="module")
def guess_server() -> Iterator[str]:
    """`chatrl env serve guess_number` (multi-turn, a hidden secret, info at the end)."""
    with running(["-m", "chatrl", "env", "serve", "guess_number", "--kwargs", '{"max_turns": 4}', "--port", "0"]) as url:
        yield url


def test_a_third_party_openenv_server_is_played_through_its_fields(word_server: str) -> None:
    env = make_env(f"openenv:{word_server}", WORD_KWARGS)
    try:
        # seed_from_task: train task 3 -> seed 6 -> WORDS[6 % 5] = "river"; eval task 3 -> seed 7 -> "stone"
        assert env.reset(options={"split": "train", "task": 3}) == ([{"role": "user", "content": "Say the word: river"}],
                                                                     {})
        assert env.step("a cloud") == ([{"role": "user", "content": "No. Try again: river"}], 0.0, False, False, {})
        assert env.step("river!") == ([], 0.5, True, False, {})  # second try: half the reward, and done
        messages, _ = env.reset(seed=99, options={"split": "eval", "task": 3})  # the seed follows the task
        assert messages == [{"role": "user", "content": "Say the word: stone"}]
        assert env.step("stone") == ([], 1.0, True, False, {})
    finally:
        env.close()


def test_a_wrong_observation_field_names_the_fields_there(word_server: str) -> None:
    env = make_env(f"openenv:{word_server}", {**WORD_KWARGS, "observation_field": "question"})
    with pytest.raises(ChatrlError, match="no field 'question' \\(it has prompt\\); set env.kwargs.observation_field"):
        env.reset(options={"task": 0})
    env.close()


def play(env, split: str, task: int) -> list:
    """One episode with scripted replies: everything the trainer would see."""
    steps = [env.reset(seed=task, options={"split": split, "task": task})]
    for reply in REPLIES:
        steps.append(env.step(reply))
        if steps[-1][2] or steps[-1][3]:
            break
    return steps


def test_chatrl_env_serve_round_trip_gives_the_same_episodes(guess_server: str) -> None:
    local = make_env("guess_number", {"max_turns": 4})
    remote = make_env(f"openenv:{guess_server}")
    try:
        episodes = {(split, task): play(local, split, task) for split in ("train", "eval") for task in range(4)}
        for (split, task), steps in episodes.items():
            assert play(remote, split, task) == steps, (split, task)
        # the episodes are not trivial: multi-turn, with hints, and both endings
        assert max(len(s) for s in episodes.values()) == 5 and any(s[-1][3] for s in episodes.values())
        assert any(s[1][0] == [{"role": "user", "content": "Higher."}] for s in episodes.values())
        assert remote.max_turns == 4
    finally:
        remote.close()


def test_env_check_passes_through_the_server(guess_server: str) -> None:
    assert check_env(f"openenv:{guess_server}", episodes=2) == []


def test_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    problems = check_env("openenv:http://127.0.0.1:9", episodes=1)  # nothing listens on port 9
    assert problems and "Failed to connect" in problems[0] and "\n" not in problems[0]
    with pytest.raises(ChatrlError, match="expected the server's URL"):
        make_env("openenv:localhost:8000")
    proc = run_cli("env", "serve", "no_such_env", "--port", "0")
    assert proc.returncode == 2 and "unknown environment 'no_such_env'" in proc.stderr and "Traceback" not in proc.stderr
    monkeypatch.setitem(sys.modules, "openenv.core", None)
    with pytest.raises(ChatrlError, match=r"pip install 'chatrl\[openenv\]'"):
        make_env("openenv:http://127.0.0.1:9")


def test_one_grpo_iteration_on_a_served_environment(guess_server: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli("grpo", "--config", "configs/tiny-grpo.yaml", f"output_dir={out}",
                   f"env.name=openenv:{guess_server}", "env.max_turns=2", "grpo.iterations=1",
                   "rollout.prompts_per_rollout=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8",
                   "grpo.mini_batches=1", "grpo.micro_batch_size=4", "checkpoint.every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = read_metrics(out)
    assert 1 <= row["turns"] <= 2 and 0 <= row["reward_mean"] <= 1
    assert (out / "actor" / "model.safetensors").exists()
