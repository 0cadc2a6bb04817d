"""The built-in environments: arithmetic, math (fixture files and the shipped GSM8K subset), guess_number, chat."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatrl.envs.arithmetic import ArithmeticEnv, is_eval_problem
from chatrl.envs.base import validate_reset, validate_step
from chatrl.envs.chat import ChatEnv
from chatrl.envs.guess_number import GuessNumberEnv, read_guess
from chatrl.envs.math_problems import MathEnv, reference_answer
from chatrl.errors import ChatrlError
from chatrl.paths import builtin_data_dir

FIXTURES = Path(__file__).parent / "fixtures" / "envs"


def first_text(env: object, split: str, task: int, seed: int | None = None) -> str:
    messages, _ = validate_reset("test", env.reset(seed=seed, options={"split": split, "task": task}))  # type: ignore[attr-defined]
    return messages[-1]["content"]


def play(env: object, reply: str) -> tuple[float, bool, bool, dict]:
    r = validate_step("test", env.step(reply))  # type: ignore[attr-defined]
    return r.reward, r.terminated, r.truncated, r.info


# ----------------------------------------------------------------------------- arithmetic


def test_arithmetic_problem_depends_on_split_and_task_only() -> None:
    env = ArithmeticEnv()
    assert first_text(env, "train", 3, seed=1) == first_text(env, "train", 3, seed=99)
    assert first_text(env, "train", 3) == first_text(ArithmeticEnv(), "train", 3)  # a fresh process-like instance
    assert first_text(env, "train", 3) != first_text(env, "train", 4)
    assert len({first_text(env, "train", t) for t in range(50)}) > 40


def test_arithmetic_train_and_eval_are_disjoint() -> None:
    env = ArithmeticEnv()
    train = {env.problem_for("train", t) for t in range(2000)}
    evals = {env.problem_for("eval", t) for t in range(2000)}
    assert train.isdisjoint(evals)
    assert len(evals) > 500 and len(train) > 1500  # both sides really vary
    assert all(is_eval_problem(*p) for p in evals) and not any(is_eval_problem(*p) for p in train)
    assert all(10 <= a <= 99 and 10 <= b <= 99 and op in "+-" for a, op, b in train | evals)


def test_arithmetic_rewards() -> None:
    env = ArithmeticEnv(ops=["*"], format_reward=0.1, system="Be brief.")
    messages, info = env.reset(options={"split": "eval", "task": 7})
    assert messages[0] == {"role": "system", "content": "Be brief."} and info == {"split": "eval", "task": 7}
    a, op, b = env.problem
    assert messages[1]["content"] == f"What is {a} * {b}? Reply with the final answer as a number."
    assert play(env, f"{a} times {b} is {a * b}.") == (1.1, True, False, {"success": True, "answer": str(a * b),
                                                                         "question": f"{a} * {b}"})
    env.reset(options={"split": "eval", "task": 7})
    reward, terminated, _, info = play(env, f"The answer is {a * b + 1}.")
    assert reward == pytest.approx(0.1) and terminated and info["success"] is False  # format only
    env.reset(options={"split": "eval", "task": 7})
    assert play(env, "I don't know.")[0] == 0.0
    with pytest.raises(ChatrlError, match="without a running episode"):
        env.step("again")


def test_arithmetic_without_options_draws_train_tasks_from_the_seed() -> None:
    env = ArithmeticEnv(digits=3, prompt="{a}{op}{b}=?")
    _, info = env.reset(seed=5)
    again = ArithmeticEnv(digits=3, prompt="{a}{op}{b}=?")
    assert again.reset(seed=5)[1] == info and info["split"] == "train"
    a, op, b = env.problem
    assert 100 <= a <= 999 and not is_eval_problem(a, op, b)


@pytest.mark.parametrize(("kwargs", "match"), [({"ops": ["/"]}, "ops"), ({"digits": 0}, "digits"),
                                               ({"prompt": "What is {x}?"}, "prompt template")])
def test_arithmetic_bad_kwargs(kwargs: dict, match: str) -> None:
    with pytest.raises(ChatrlError, match=match):
        ArithmeticEnv(**kwargs)


# ----------------------------------------------------------------------------- math


def test_reference_answer_follows_gsm8k() -> None:
    assert reference_answer("48/2 = <<48/2=24>>24\n#### 72") == "72"
    assert reference_answer("so 1,000 + 200\n#### 1,200") == "1200"
    assert reference_answer("#### 3 #### 5") == "5"
    assert reference_answer("  4.5 ") == "4.5"


def test_math_env_on_a_fixture_file() -> None:
    env = MathEnv(path=str(FIXTURES / "math_tiny.jsonl"), eval_size=2)
    assert len(env.problems["train"]) == 3 and len(env.problems["eval"]) == 2
    assert {q for q, _ in env.problems["train"]}.isdisjoint(q for q, _ in env.problems["eval"])
    answers = {q: a for q, a in env.problems["train"] + env.problems["eval"]}
    assert answers["A box holds 250 pens. How many pens are in 4 boxes?"] == "1000"
    assert answers["What is 10 minus 12?"] == "-2" and answers["Half of 9 is?"] == "4.5"
    for task in range(6):  # task -> row by task % n, the same problem every time
        assert first_text(env, "train", task) == first_text(env, "train", task + 3, seed=task)
    env.reset(options={"split": "train", "task": 0})
    question, answer = env.current
    reward, terminated, truncated, info = play(env, f"Working... The answer is {answer}.")
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert info == {"success": True, "answer": answer, "question": question}


def test_math_env_on_a_csv_with_other_keys() -> None:
    env = MathEnv(path=str(FIXTURES / "math_tiny.csv"), question_key="q", answer_key="a", eval_size=1,
                  prompt="Q: {question}")
    env.reset(options={"split": "train", "task": 0})
    text = first_text(env, "train", 0)
    assert text.startswith("Q: ")
    answer = env.current[1]
    assert play(env, answer)[0] == 1.0


def test_math_env_bad_rows_name_file_line_and_field(tmp_path: Path) -> None:
    with pytest.raises(ChatrlError, match=r"math_bad\.jsonl:3: no answer field 'answer'") as e:
        MathEnv(path=str(FIXTURES / "math_bad.jsonl"), eval_size=1)
    assert "\n" not in str(e.value)
    empty = tmp_path / "empty_answer.jsonl"
    empty.write_text(json.dumps({"question": "q?", "answer": "x"}) + "\n" + json.dumps({"question": "q2?", "answer": " "}))
    with pytest.raises(ChatrlError, match=r"empty_answer\.jsonl:2: field 'answer' is empty"):
        MathEnv(path=str(empty), eval_size=1)
    with pytest.raises(ChatrlError, match="eval_size"):
        MathEnv(path=str(FIXTURES / "math_tiny.jsonl"), eval_size=5)
    with pytest.raises(ChatrlError, match="not found"):
        MathEnv(path=str(tmp_path / "missing.jsonl"))


def test_math_env_on_the_shipped_gsm8k_subset() -> None:
    shipped = builtin_data_dir() / "gsm8k"
    assert (shipped / "LICENSE").is_file() and "MIT" in (shipped / "LICENSE").read_text()
    assert len((shipped / "train.jsonl").read_text().splitlines()) == 2000
    env = MathEnv()
    assert len(env.problems["eval"]) == 200 and len(env.problems["train"]) == 1800
    assert {q for q, _ in env.problems["train"]}.isdisjoint(q for q, _ in env.problems["eval"])
    natalia = [a for q, a in env.problems["train"] + env.problems["eval"] if q.startswith("Natalia sold clips")]
    assert natalia == ["72"]  # "... #### 72"
    assert all(a and "," not in a and "####" not in a for _, a in env.problems["train"])
    assert first_text(env, "eval", 0) != first_text(env, "train", 0)


# ----------------------------------------------------------------------------- guess_number


def binary_search(env: GuessNumberEnv, low: int, high: int) -> tuple[int, float, dict, list[str]]:
    """Play by halving; returns (turns, summed reward, final info, the env's replies)."""
    total, replies = 0.0, []
    for turn in range(1, env.max_turns + 1):
        guess = (low + high) // 2
        result = validate_step("guess", env.step(f"My guess is {guess}."))
        total += result.reward
        if result.terminated or result.truncated:
            return turn, total, result.info, replies
        reply = result.messages[0]["content"]
        replies.append(reply)
        low, high = (guess + 1, high) if reply == "Higher." else (low, guess - 1)
    raise AssertionError("the episode did not end")


def test_guess_number_binary_search_finds_the_secret() -> None:
    env = GuessNumberEnv(low=1, high=100, max_turns=7)  # 7 halvings cover 100 numbers
    for task in range(5):
        env.reset(options={"split": "train", "task": task})
        turns, total, info, replies = binary_search(env, 1, 100)
        assert info["success"] is True and info["answer"] == str(env.secret) and info["turns"] == turns
        assert total == pytest.approx(1 - (turns - 1) / 7)
        assert set(replies) <= {"Higher.", "Lower."} and len(replies) == turns - 1


def test_guess_number_reward_by_hand() -> None:
    env = GuessNumberEnv(max_turns=6)
    messages, _ = env.reset(options={"split": "eval", "task": 3})
    assert len(messages) == 1 and "between 1 and 100" in messages[0]["content"]
    secret = env.secret
    assert play(env, str(secret)) == (1.0, True, False, {"success": True, "answer": str(secret), "turns": 1})
    env.reset(options={"split": "eval", "task": 3})
    assert env.secret == secret
    wrong = 1 if secret != 1 else 2
    assert play(env, str(wrong))[:3] == (0.0, False, False)
    assert validate_step("g", env.step("hmm, no idea")).messages == [
        {"role": "user", "content": "Please reply with a single number."}]
    assert play(env, f"It must be {secret}!")[0] == pytest.approx(1 - 2 / 6)  # third turn: 0.6667


def test_guess_number_out_of_turns_is_truncated() -> None:
    env = GuessNumberEnv(low=1, high=10, max_turns=3)
    env.reset(options={"split": "train", "task": 0})
    wrong = 10 if env.secret != 10 else 1
    results = [validate_step("g", env.step(r)) for r in (str(wrong), "nothing", str(wrong))]
    assert [(r.reward, r.terminated, r.truncated) for r in results] == [(0.0, False, False)] * 2 + [(0.0, False, True)]
    assert results[-1].info == {"success": False, "answer": str(env.secret), "turns": 3}
    assert results[0].messages[0]["content"] == ("Lower." if wrong > env.secret else "Higher.")


def test_guess_number_splits_are_disjoint() -> None:
    env = GuessNumberEnv()
    train = {env.secret_for("train", t) for t in range(500)}
    evals = {env.secret_for("eval", t) for t in range(500)}
    assert train.isdisjoint(evals) and len(evals) == 10 and len(train) == 90


def test_read_guess() -> None:
    assert [read_guess(r) for r in ("50", "I think 12, no, 37.", "42.0", "4.5", "no", "-3")] == [50, 37, 42, None, None, -3]


# ----------------------------------------------------------------------------- chat


def test_chat_env_from_explicit_prompts() -> None:
    env = ChatEnv(prompts=["Hello!", [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]],
                  eval_prompts=["Held out?"])
    assert env.reset(options={"split": "train", "task": 0})[0] == [{"role": "user", "content": "Hello!"}]
    messages, info = env.reset(options={"split": "train", "task": 3})  # 3 % 2 = 1
    assert [m["role"] for m in messages] == ["system", "user"] and info["source"] == "env.kwargs.prompts[1]"
    assert env.step("Hi there") == ([], 0.0, True, False, {"reference": None})
    assert first_text(env, "eval", 5) == "Held out?"
    with pytest.raises(ChatrlError, match="eval_prompts"):
        ChatEnv(prompts=["a"]).reset(options={"split": "eval", "task": 0})
    with pytest.raises(ChatrlError, match=r"prompts\[1\]"):
        ChatEnv(prompts=["ok", 3])  # type: ignore[list-item]
