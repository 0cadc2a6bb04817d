"""Built-in reward functions with the project's signature `fn(prompts, responses, **columns) -> list[float]`.

Columns (`reference`, `response_ids`, dataset columns) are passed only to functions that name them, so each
function asks for exactly what it reads. Functions get no config: a parametrised one is made by a factory
(`format_check_fn(pattern)`) and named as `chatrl.envs.rewards:...` or through BUILTIN_REWARD_FUNCTIONS.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from chatrl.envs.answers import answers_match

RewardFunction = Callable[..., list[float]]

# the reply ends with a final-answer sentence: "... The answer is 72." or "\boxed{72}" with at most a short tail
FINAL_ANSWER_PATTERN = r"(?:answer is:?|\\boxed\{)\s*\S[^\n]{0,40}$"
LENGTH_SCALE = 100.0  # length_penalty: -1.0 per LENGTH_SCALE response tokens


def answer_match(prompts: Sequence[object], responses: list[str], reference: list[str | None]) -> list[float]:
    """1.0 when the response's final answer equals the row's reference answer (math-verify), else 0.0; a row
    without a reference scores 0.0."""
    return [1.0 if ref is not None and answers_match(r, str(ref)) else 0.0 for r, ref in zip(responses, reference, strict=True)]


def format_check_fn(pattern: str, flags: int = re.IGNORECASE) -> RewardFunction:
    """A reward function giving 1.0 to responses (stripped) in which `pattern` is found (re.search), else 0.0."""
    regex = re.compile(pattern, flags)

    def format_check(prompts: Sequence[object], responses: list[str]) -> list[float]:
        return [1.0 if regex.search(r.strip()) else 0.0 for r in responses]

    format_check.__doc__ = f"1.0 when the response matches {pattern!r}, else 0.0."
    return format_check


format_check = format_check_fn(FINAL_ANSWER_PATTERN)
format_check.__doc__ = "1.0 when the response ends with a final-answer sentence ('The answer is 72.', '\\boxed{72}')."


def length_penalty(prompts: Sequence[object], responses: list[str], response_ids: list[list[int]]) -> list[float]:
    """-len(response tokens) / 100: -0.01 per token, to weigh (reward.function_weights) against verbosity."""
    return [-len(ids) / LENGTH_SCALE for ids in response_ids]


BUILTIN_REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "answer_match": answer_match,
    "format_check": format_check,
    "length_penalty": length_penalty,
}
