"""`env.name=reasoning_gym:TASK`: reasoning-gym's generators and verifiers as a chatrl environment (the real
package, installed by the dev extra)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from chatrl.envs import make_env
from chatrl.envs.check import check_env
from chatrl.errors import ChatrlError
from helpers import read_metrics, run_cli

pytest.importorskip("reasoning_gym")


def first_question(env, split: str, task: int) -> str:
    messages, info = env.reset(seed=123, options={"split": split, "task": task})
    assert info == {"split": split, "task": task}
    return messages[-1]["content"]


def test_a_problem_is_a_function_of_split_and_task_and_eval_is_held_out() -> None:
    env = make_env("reasoning_gym:basic_arithmetic")
    other = make_env("reasoning_gym:basic_arithmetic")
    train = [first_question(env, "train", t) for t in range(40)]
    assert train == [first_question(other, "train", t) for t in range(40)]  # another instance, same problems
    assert first_question(env, "train", 7) == train[7]  # and again after other tasks
    evals = [first_question(env, "eval", t) for t in range(40)]
    assert len(set(train)) == 40 and not set(train) & set(evals)


def test_the_reply_is_scored_by_the_task_verifier() -> None:
    env = make_env("reasoning_gym:chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})
    messages, _ = env.reset(options={"task": 5})
    assert messages[0]["role"] == "system" and "<answer>" in messages[0]["content"]  # reasoning-gym's own prompt
    question = messages[1]["content"]
    expression = question.split(":")[-1].split("=")[0].strip()  # "... problem: 4 + 7 ="
    assert len(expression.split()) == 3  # the config's 2 terms of 1 digit: "a op b"
    a, op, b = expression.split()
    gold = int(a) + int(b) if op == "+" else int(a) - int(b)
    assert env.entry["answer"] == str(gold)
    _, reward, terminated, truncated, info = env.step(f"Adding up: <answer>{gold}</answer>")
    assert (reward, terminated, truncated, info["success"], info["extracted"]) == (1.0, True, False, True, str(gold))
    env.reset(options={"task": 5})
    assert env.step(f"<answer>{gold + 1}</answer>")[1:2] == (0.0,)
    env.reset(options={"task": 5})
    _, reward, _, _, info = env.step(str(gold))  # right number, but not in the tags the prompt asks for
    assert reward == 0.0 and info["extracted"] is None and info["success"] is False


def test_whole_reply_scoring_and_partial_credit() -> None:
    # no tags: the whole reply is the answer; leg_counting uses reasoning-gym's default verifier, which gives
    # len(answer) / len(reply) when the reply contains the answer: "N legs" -> len("N") / len("N legs")
    env = make_env("reasoning_gym:leg_counting", {"system_prompt": None, "answer_tag": None})
    messages, _ = env.reset(options={"task": 2})
    assert [m["role"] for m in messages] == ["user"]
    gold = env.entry["answer"]
    _, reward, _, _, info = env.step(f"{gold} legs")
    assert reward == pytest.approx(len(gold) / len(f"{gold} legs")) and info["success"] is False
    env.reset(options={"task": 2})
    assert env.step(f" {gold} ")[1] == 1.0


def test_env_check_passes() -> None:
    assert check_env("reasoning_gym:chain_sum", {"max_terms": 3}, episodes=3) == []


@pytest.mark.parametrize(("spec", "kwargs", "expected"), [
    ("reasoning_gym:no_such_task", {}, "no task 'no_such_task'"),
    ("reasoning_gym:chain_sum", {"bogus": 1}, "unexpected keyword argument 'bogus'"),
    ("reasoning_gym:chain_sum", {"min_terms": 0}, "min_terms must be positive"),
    ("reasoning_gym:chain_sum", {"seed": 3}, "env.kwargs.seed is set by chatrl"),
    ("reasoning_gym:", {}, "names nothing after 'reasoning_gym:'"),
])
def test_bad_specs_are_one_line(spec: str, kwargs: dict, expected: str) -> None:
    with pytest.raises(ChatrlError, match=expected) as err:
        make_env(spec, kwargs)
    assert "\n" not in str(err.value)


def test_a_missing_package_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # import raises ImportError
    with pytest.raises(ChatrlError, match=r"pip install 'chatrl\[reasoning-gym\]'"):
        make_env("reasoning_gym:chain_sum")


def test_one_grpo_iteration(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli("grpo", "--config", "configs/tiny-grpo.yaml", f"output_dir={out}",
                   "env.name=reasoning_gym:chain_sum", "env.kwargs={max_terms: 2}", "grpo.iterations=1",
                   "rollout.prompts_per_rollout=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8",
                   "grpo.mini_batches=1", "grpo.micro_batch_size=4", "checkpoint.every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = read_metrics(out)
    assert row["turns"] == 1 and 0 <= row["reward_mean"] <= 1 and row["success_rate"] in (0, 0.25, 0.5, 0.75, 1)
    assert (out / "actor" / "model.safetensors").exists()
