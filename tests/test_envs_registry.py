"""make_env (built-ins, user files, bad specs and kwargs), the validators, and check_env on broken environments."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from chatrl.config import DataConfig
from chatrl.envs import BUILTIN_ENVS, chat, make_env, math_problems
from chatrl.envs.arithmetic import ArithmeticEnv
from chatrl.envs.base import StepResult, call_env, validate_reset, validate_step
from chatrl.envs.check import check_env, run_check
from chatrl.errors import ChatrlError

CUSTOM = str(Path(__file__).parent / "fixtures" / "envs" / "custom_envs.py")


def test_make_env_builtins() -> None:
    assert set(BUILTIN_ENVS) == {"arithmetic", "math", "guess_number", "chat"}
    env = make_env("arithmetic", {"digits": 3, "ops": ["*"]})
    assert isinstance(env, ArithmeticEnv) and env.ops == ["*"] and env.low == 100
    assert make_env("guess_number", {"max_turns": 4}).max_turns == 4


def test_make_env_from_a_file_class_and_a_factory() -> None:
    env = make_env(f"{CUSTOM}:EchoEnv", {"turns": 3})
    assert type(env).__name__ == "EchoEnv" and env.max_turns == 3
    assert make_env(f"{CUSTOM}:make_echo").max_turns == 2


@pytest.mark.parametrize(("spec", "kwargs", "match"), [
    ("nope", None, "unknown environment 'nope': built-ins are arithmetic"),
    (f"{CUSTOM}:NotAnEnv", None, "does not subclass gymnasium.Env"),
    (f"{CUSTOM}:make_not_env", None, "returned a dict, not a gymnasium.Env"),
    (f"{CUSTOM}:Missing", None, "cannot be loaded"),
    ("arithmetic", {"digitz": 3}, r"'arithmetic' does not accept env.kwargs \{\"digitz\": 3\}"),
    ("arithmetic", {"digits": 42}, r"'arithmetic' with env.kwargs \{\"digits\": 42\}: arithmetic: digits=42"),
    (f"{CUSTOM}:EchoEnv", {"turns": 1, "colour": "red"}, "does not accept env.kwargs"),
    ("arithmetic", ["digits"], "env.kwargs must be a mapping"),
])
def test_make_env_errors_are_one_line(spec: str, kwargs: object, match: str) -> None:
    with pytest.raises(ChatrlError, match=match) as e:
        make_env(spec, kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


def test_chat_env_reads_the_runs_data(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i}", "level": i}) + "\n"
                            for i in range(40)))
    data = DataConfig(paths=[str(path)], split="0,0,1", eval_fraction=0.25)
    env = make_env("chat", data=data)
    train = {env.reset(options={"split": "train", "task": t})[0][0]["content"] for t in range(40)}
    evals = {env.reset(options={"split": "eval", "task": t})[0][0]["content"] for t in range(40)}
    assert train.isdisjoint(evals) and len(train) + len(evals) == 40 and len(evals) == 10
    messages, _ = env.reset(options={"split": "train", "task": 0})
    i = int(messages[0]["content"].split()[1].rstrip("?"))
    assert env.step("Sure.") == ([], 0.0, True, False, {"level": i, "reference": f"Answer {i}"})


def test_environment_instances_share_one_read_of_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the trainer makes one instance per rollout row: the data must be read once, and again only when it changes
    calls: list[str] = []
    read_source = math_problems.read_source
    monkeypatch.setattr(math_problems, "read_source", lambda *a, **k: calls.append("math") or read_source(*a, **k))
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(5)))
    envs = [make_env("math", {"path": str(path), "eval_size": 1}) for _ in range(3)]
    assert calls == ["math"] and envs[0].problems == envs[2].problems
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"#### {i + 10}"}) + "\n" for i in range(6)))
    assert sorted(a for _, a in make_env("math", {"path": str(path), "eval_size": 1}).problems["train"])[0] == "10"
    assert calls == ["math", "math"]
    load_records = chat.load_records
    monkeypatch.setattr(chat, "load_records", lambda *a, **k: calls.append("chat") or load_records(*a, **k))
    chat_path = tmp_path / "c.jsonl"
    chat_path.write_text("".join(json.dumps({"prompt": f"P{i}"}) + "\n" for i in range(20)))
    data = DataConfig(paths=[str(chat_path)], split="0,0,1", eval_fraction=0.2)
    for _ in range(3):
        make_env("chat", data=data).reset(options={"split": "train", "task": 0})
    assert calls.count("chat") == 1


# ----------------------------------------------------------------------------- validators


def test_validators_accept_good_results() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert validate_reset("e", (msgs, {})) == (msgs, {})
    assert validate_step("e", ([], np.float32(0.5), np.bool_(True), False, {"success": True})) == StepResult(
        [], 0.5, True, False, {"success": True})
    assert validate_step("e", (msgs, 2, False, False, {})).reward == 2.0


@pytest.mark.parametrize(("result", "message"), [
    (([], 1.0, True, {}), "environment 'x' step() returned a 4-tuple (the old gym API"),
    (([], float("nan"), True, False, {}), "environment 'x' step() returned reward nan: expected a finite number"),
    (([], math.inf, True, False, {}), "returned reward inf: expected a finite number"),
    (([], "1.0", True, False, {}), "returned reward '1.0' (str): expected a number"),
    (([], None, True, False, {}), "returned reward None (NoneType): expected a number"),
    (([], True, True, False, {}), "returned reward True (bool): expected a number"),
    (("Say 1.", 1.0, True, False, {}), "returned observation 'Say 1.' (str): expected a list of messages"),
    (([{"role": "user"}], 1.0, True, False, {}), "returned message 0 = {'role': 'user'}: expected a dict with str"),
    (([{"role": "User", "content": "hi"}], 1.0, True, False, {}),
     "returned message 0 with role 'User': expected a role in system, user, assistant"),
    (([], 1.0, 1, False, {}), "returned terminated 1 (int): expected a bool"),
    (([], 1.0, True, False, None), "returned info None (NoneType): expected a dict"),
    (None, "step() returned None: expected (messages, reward, terminated, truncated, info)"),
])
def test_validate_step_rejects_bad_results(result: object, message: str) -> None:
    with pytest.raises(ChatrlError) as e:
        validate_step("x", result)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_validate_reset_rejects_bad_results() -> None:
    with pytest.raises(ChatrlError, match=r"reset\(\) returned observation 'hi' \(str\)"):
        validate_reset("x", ("hi", {}))
    with pytest.raises(ChatrlError, match=r"reset\(\) returned a 3-tuple: expected \(messages, info\)"):
        validate_reset("x", ([], {}, None))


def test_call_env_turns_exceptions_into_one_line() -> None:
    env = make_env(f"{CUSTOM}:RaisingEnv")
    env.reset(options={"task": 1})
    with pytest.raises(ChatrlError) as e:
        call_env("mine", "step('1')", env.step, "1")
    assert str(e.value) == "environment 'mine' step('1') raised KeyError: 'boom'"
    assert e.value.__cause__ is None and e.value.__suppress_context__


# ----------------------------------------------------------------------------- check_env


def test_check_env_passes_builtins_and_a_valid_custom_env() -> None:
    assert check_env("arithmetic", episodes=3) == []
    assert check_env("guess_number", {"max_turns": 3}, episodes=2) == []
    report = run_check(f"{CUSTOM}:EchoEnv", {"turns": 2}, episodes=3)
    assert report.problems == [] and report.turns == [2] * 6 and len(report.successes) == 6


@pytest.mark.parametrize(("name", "expected"), [
    ("NanRewardEnv", "step() returned reward nan: expected a finite number"),
    ("StrRewardEnv", "returned reward '1.0' (str)"),
    ("OldApiEnv", "the old gym API"),
    ("StrObservationEnv", "reset() returned observation 'Say 1.' (str)"),
    ("RaisingEnv", "raised KeyError: 'boom'"),
    ("EndlessEnv", "did not end within 8 turns"),
    ("SplitBlindEnv", "train and eval gave the same first observation"),
    ("SeedDependentEnv", "the problem must depend only on (split, task)"),
    ("NotAnEnv", "does not subclass gymnasium.Env"),
])
def test_check_env_names_the_problem(name: str, expected: str) -> None:
    problems = check_env(f"{CUSTOM}:{name}", episodes=2)
    assert any(expected in p for p in problems), problems
    assert all("\n" not in p for p in problems)
    assert len(problems) == len(set(problems)) <= 3  # the same failure in every episode is reported once
