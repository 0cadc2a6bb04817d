"""The text-environment base class and the validators that stand between user environments and the trainer.

A user's environment is code we do not control: the trainer and `chatrl env check` pass every reset()/step()
result through `validate_reset` / `validate_step` and every call through `call_env`, so a wrong return type or a
crash becomes one line naming the environment and what it returned, not a traceback from deep in the trainer.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import gymnasium
import numpy as np
from gymnasium.spaces import Text

from chatrl.data.types import Message
from chatrl.errors import ChatrlError

SPLITS = ("train", "eval")
ROLES = ("system", "user", "assistant", "tool")  # tool: a tool result (rendered by the chat template)
MAX_TEXT = 100_000  # documentation only: spaces are not used for validation
# printable ASCII plus common Latin-1/typographic characters; real replies may hold anything (documentation only)
CHARSET = string.printable + "".join(chr(c) for c in range(0xA0, 0x250)) + "\u2013\u2014\u2018\u2019\u201c\u201d\u2026"
T = TypeVar("T")


def stable_seed(*parts: object) -> int:
    """A seed from values that is the same in every process (Python's hash() is salted per process)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def system(text: str) -> Message:
    return {"role": "system", "content": text}


def tool_message(name: str, text: str) -> Message:
    """A tool's result as the chat templates expect it (role "tool", the tool's name)."""
    return {"role": "tool", "name": name, "content": text}


class TextEnv(gymnasium.Env):
    """Base of the built-in environments: observations are lists of chat messages, actions are reply strings.

    Subclasses implement `_start(split, task) -> (messages, info)` (reset() handles seeding and options) and
    step(), which begins with `action = self._begin_step(action)` (checks the episode is running, counts the turn
    in `self.turns`) and sets `self.done = True` when the episode ends. `tools`: the tools the model may call
    inside a turn (`chatrl.tools.schema`: callables, (schema, callable) pairs, built-in names or specs)."""

    metadata: dict[str, Any] = {"render_modes": []}
    max_turns: int = 1
    tools: tuple[Any, ...] = ()
    observation_space = Text(MAX_TEXT, min_length=0, charset=CHARSET)  # really: a list of {"role", "content"}
    action_space = Text(MAX_TEXT, min_length=0, charset=CHARSET)

    def __init__(self) -> None:
        self.turns = 0
        self.done = True  # until the first reset()

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[list[Message], dict[str, Any]]:
        super().reset(seed=seed)  # seeds self.np_random; the problem itself depends only on (split, task)
        split, task = self._task_for(options)
        return self._start(split, task)

    def _start(self, split: str, task: int) -> tuple[list[Message], dict[str, Any]]:
        raise NotImplementedError

    def _task_for(self, options: dict[str, Any] | None) -> tuple[str, int]:
        """(split, task) from reset()'s options; without a task, one is drawn from `self.np_random` (train)."""
        options = options or {}
        split = options.get("split", "train")
        if split not in SPLITS:
            raise ChatrlError(f"reset(options={{'split': {split!r}}}): split must be 'train' or 'eval'")
        task = options.get("task")
        if task is None:
            task = int(self.np_random.integers(0, 2**31 - 1))
        elif isinstance(task, bool) or not isinstance(task, (int, np.integer)) or task < 0:
            raise ChatrlError(f"reset(options={{'task': {task!r}}}): task must be a non-negative integer")
        self.turns, self.done = 0, False
        return split, int(task)

    def _begin_step(self, action: str) -> str:
        if self.done:
            raise ChatrlError("step() called without a running episode; call reset() first")
        if not isinstance(action, str):
            raise ChatrlError(f"step() expects the reply text (str), got {type(action).__name__}")
        self.turns += 1
        return action


# ----------------------------------------------------------------------------- validators


@dataclass
class StepResult:
    """One validated step() result."""

    messages: list[Message]
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any] = field(default_factory=dict)


def _fail(name: str, what: str, got: str, expected: str) -> ChatrlError:
    return ChatrlError(f"environment '{name}' {what} returned {got}: expected {expected}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _messages(name: str, what: str, value: object) -> list[Message]:
    if not isinstance(value, list):
        raise _fail(name, what, f"observation {_short(value)} ({type(value).__name__})",
                    "a list of messages [{'role': ..., 'content': ...}]")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _fail(name, what, f"message {i} = {_short(m)}", "a dict with str 'role' and 'content'")
        if m["role"] not in ROLES:  # chat templates know only these; a typo would fail much later
            raise _fail(name, what, f"message {i} with role {m['role']!r}", f"a role in {', '.join(ROLES)}")
    # a tool result keeps its tool's name (templates show it); everything else is role and content only
    return [{"role": m["role"], "content": m["content"],
             **({"name": m["name"]} if m["role"] == "tool" and isinstance(m.get("name"), str) else {})}
            for m in value]


def _info(name: str, what: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(name, what, f"info {_short(value)} ({type(value).__name__})", "a dict")
    return value


def validate_reset(name: str, result: object) -> tuple[list[Message], dict[str, Any]]:
    """Check a reset() result is (messages, info)."""
    if not isinstance(result, tuple) or len(result) != 2:
        got = f"a {len(result)}-tuple" if isinstance(result, tuple) else _short(result)
        raise _fail(name, "reset()", got, "(messages, info) as in Gymnasium >= 0.26")
    return _messages(name, "reset()", result[0]), _info(name, "reset()", result[1])


def _flag(name: str, key: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise _fail(name, "step()", f"{key} {_short(value)} ({type(value).__name__})", "a bool")
    return bool(value)


def validate_step(name: str, result: object) -> StepResult:
    """Check a step() result is (messages, reward, terminated, truncated, info) with a finite reward."""
    if isinstance(result, tuple) and len(result) == 4:
        raise _fail(name, "step()", "a 4-tuple (the old gym API: obs, reward, done, info)",
                    "(messages, reward, terminated, truncated, info) as in Gymnasium >= 0.26")
    if not isinstance(result, tuple) or len(result) != 5:
        got = f"a {len(result)}-tuple" if isinstance(result, tuple) else _short(result)
        raise _fail(name, "step()", got, "(messages, reward, terminated, truncated, info)")
    messages, reward, terminated, truncated, info = result
    if isinstance(reward, (bool, np.bool_)) or not isinstance(reward, numbers.Real):
        raise _fail(name, "step()", f"reward {_short(reward)} ({type(reward).__name__})", "a number")
    if not math.isfinite(float(reward)):
        raise _fail(name, "step()", f"reward {float(reward)}", "a finite number")
    return StepResult(_messages(name, "step()", messages), float(reward), _flag(name, "terminated", terminated),
                      _flag(name, "truncated", truncated), _info(name, "step()", info))


def call_env(name: str, what: str, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Run a user environment method; any exception becomes one ChatrlError line (no traceback)."""
    try:
        return fn(*args, **kwargs)
    except ChatrlError as e:  # a built-in environment's own, already worded error
        raise ChatrlError(f"environment '{name}' {what}: {_one_line(e)}") from None
    except Exception as e:
        raise ChatrlError(f"environment '{name}' {what} raised {type(e).__name__}: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = " / ".join(lines)
    return text if len(text) <= 300 else text[:297] + "..."
