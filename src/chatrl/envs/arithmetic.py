"""`arithmetic`: one-turn generated sums ("What is 37 + 58?"), the smallest environment with a checkable answer.

Problems are generated, not read, so there is an endless supply; each is a pure function of (split, task). Train
and eval are disjoint by construction: a problem's canonical text "37+58" hashes (crc32, stable across processes)
into one of 10 buckets; bucket 0 is eval-only, the rest train-only, and a problem of the wrong bucket is redrawn.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

from chatrl.data.types import Message
from chatrl.envs.answers import answers_match, extract_answer
from chatrl.envs.base import TextEnv, stable_seed, system, user
from chatrl.errors import ChatrlError
from chatrl.tools.parsers import ToolCall
from chatrl.tools.schema import resolve_tools

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
EVAL_BUCKETS = 10  # 1 in 10 problems is eval-only
MAX_DRAWS = 10_000
DEFAULT_PROMPT = "What is {a} {op} {b}? Reply with the final answer as a number."


def is_eval_problem(a: int, op: str, b: int) -> bool:
    return zlib.crc32(f"{a}{op}{b}".encode()) % EVAL_BUCKETS == 0


class ArithmeticEnv(TextEnv):
    """kwargs: digits (operand size), ops (subset of + - *), prompt (template with {a} {op} {b}), system (an
    optional system message), format_reward (added when the reply holds a parseable answer at all), tools (tools the
    model may call inside its turn: built-in names such as "calculator" or "python", or 'pkg.module:fn'; the
    config's env.tools adds to them)."""

    max_turns = 1

    def __init__(self, digits: int = 2, ops: list[str] | None = None, prompt: str = DEFAULT_PROMPT,
                 system: str | None = None, format_reward: float = 0.0, tools: list[str] | None = None) -> None:
        super().__init__()
        self.tools = tuple(resolve_tools(tools, "arithmetic: tools"))
        ops = ["+", "-"] if ops is None else list(ops)
        if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 9:
            raise ChatrlError(f"arithmetic: digits={digits!r} must be an integer from 1 to 9")
        if not ops or any(op not in OPS for op in ops):
            raise ChatrlError(f"arithmetic: ops={ops!r} must be a non-empty list of {', '.join(OPS)}")
        try:
            prompt.format(a=1, op="+", b=2)
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise ChatrlError(f"arithmetic: prompt template {prompt!r} is invalid ({e}); use {{a}}, {{op}}, {{b}}"
                              ) from None
        self.low, self.high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
        self.ops, self.prompt, self.system, self.format_reward = ops, prompt, system, float(format_reward)
        self.problem: tuple[int, str, int] = (0, "+", 0)

    def problem_for(self, split: str, task: int) -> tuple[int, str, int]:
        """(a, op, b) of a task: drawn from an RNG seeded by (split, task), redrawn until it is in the split."""
        rng = random.Random(stable_seed("arithmetic", self.low, self.high, *self.ops, split, task))
        for _ in range(MAX_DRAWS):
            a, op, b = rng.randint(self.low, self.high), rng.choice(self.ops), rng.randint(self.low, self.high)
            if is_eval_problem(a, op, b) == (split == "eval"):
                return a, op, b
        raise ChatrlError(f"arithmetic: no {split} problem found with digits/ops {self.ops}; the problem space is "
                          "too small to hold out an eval set, use more digits or ops")

    @property
    def answer(self) -> int:
        a, op, b = self.problem
        return OPS[op](a, b)

    def _start(self, split: str, task: int) -> tuple[list[Message], dict[str, Any]]:
        self.problem = self.problem_for(split, task)
        a, op, b = self.problem
        messages = [system(self.system)] if self.system else []
        messages.append(user(self.prompt.format(a=a, op=op, b=b)))
        return messages, {"split": split, "task": task}

    def solution(self, tools: list[str]) -> list[ToolCall | str]:
        """A reference solution of the current problem (`chatrl.envs.demos` writes SFT demonstrations from it): a
        calculator call when the calculator is offered, then the final answer."""
        a, op, b = self.problem
        steps: list[ToolCall | str] = []
        if "calculator" in tools:
            steps.append(ToolCall("calculator", {"expression": f"{a}{op}{b}"}))
        return [*steps, f"The answer is {self.answer}."]

    def step(self, action: str) -> tuple[list[Message], float, bool, bool, dict[str, Any]]:
        reply = self._begin_step(action)
        self.done = True
        answer = str(self.answer)
        success = answers_match(reply, answer)
        reward = float(success)
        if self.format_reward and extract_answer(reply) is not None:
            reward += self.format_reward
        a, op, b = self.problem
        return [], reward, True, False, {"success": success, "answer": answer, "question": f"{a} {op} {b}"}
