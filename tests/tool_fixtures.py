"""Tools, parsers and environments the tool tests plug in by spec (`tool_fixtures:NAME`)."""

from __future__ import annotations

import threading
import time
from typing import Any

from chatrl.envs.base import TextEnv, user
from chatrl.tools.parsers import ToolCall

RELEASE = threading.Event()  # set by a test to let `hang` return


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def slow_add(a: int, b: int) -> int:
    """Add two integers after a short wait.

    Args:
        a: The first number.
        b: The second number.
    """
    time.sleep(0.4)
    return a + b


def hang(a: int) -> str:
    """Never return (until a test releases it).

    Args:
        a: Anything.
    """
    RELEASE.wait(60)
    return "released"


def explode(a: int) -> str:
    """Raise.

    Args:
        a: Anything.
    """
    raise RuntimeError("the tool broke\nsecond line")


class Unprintable:
    def __str__(self) -> str:
        raise ValueError("no text")

    __repr__ = __str__


def unprintable(a: int) -> object:
    """Return something without a text form.

    Args:
        a: Anything.
    """
    return Unprintable()


def no_docstring(a: int) -> int:
    return a


def every_reply_calls(text: str) -> list[dict[str, Any]]:
    """A user parser for runs with a random model: every reply calls calculator on 1+1."""
    return [{"name": "calculator", "arguments": {"expression": "1+1"}}]


def bracket_parser(text: str) -> list[ToolCall]:
    """A user parser: CALL name a b."""
    if not text.startswith("CALL "):
        return []
    _, name, a, b = text.split()
    return [ToolCall(name, {"a": int(a), "b": int(b)})]


def broken_parser(text: str) -> list[ToolCall]:
    raise KeyError("oops")


class AddEnv(TextEnv):
    """One turn: 'What is 2 + 3?'; reward 1 when the reply contains 5. Records the replies step() received."""

    tools = (add,)

    def __init__(self, tools: tuple = (add,)) -> None:
        super().__init__()
        self.tools = tools
        self.stepped: list[str] = []

    def _start(self, split: str, task: int) -> tuple[list[dict], dict]:
        return [user("What is 2 + 3?")], {}

    def step(self, action: str):
        self.stepped.append(self._begin_step(action))
        self.done = True
        ok = "5" in action
        return [], float(ok), True, False, {"success": ok}
