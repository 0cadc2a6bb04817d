"""Final-answer extraction and comparison, done by Hugging Face's `math_verify` rather than a hand-written parser.

math-verify knows the ways models write answers ("85", "85.0", "$85$", "\\boxed{85}", "The answer is 85.",
"1/2" vs "0.5", "1,000") and compares them symbolically. What it does with several candidates (pinned in
tests/test_envs_answers.py): an answer-anchored match ("the answer is 85", "\\boxed{85}") wins over a bare
number, and among matches of the same kind the RIGHTMOST one is taken; so "I got 85, no wait: 90" gives 90, while
"The answer is 85. Hmm, 90?" gives 85.

Guards: math-verify limits its own time with `signal.alarm`, which only works in the main thread (elsewhere it
raises ValueError), so the timeout is passed only there; very long replies are cut to their end (where the final
answer is) because parsing time grows with the text; any exception means "no answer".
"""

from __future__ import annotations

import functools
import logging
import threading

import sympy
from math_verify import parse, verify
from math_verify.errors import TimeoutException

TIMEOUT_S = 5  # per parse / comparison, main thread only
LONG_REPLY = 1000  # replies longer than this (characters) are cut to their last TAIL characters before parsing
TAIL = 300


class _NoTimeoutWarning(logging.Filter):
    """math-verify warns once per process when called without a timeout (our non-main-thread case); that is
    deliberate here and the text is cut short, so drop that one message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutWarning())


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _tail(text: str) -> str:
    """The end of an over-long reply, starting at a word boundary so no number is cut in half."""
    if len(text) <= LONG_REPLY:
        return text
    tail = text[-TAIL:]
    space = tail.find(" ")
    return tail[space + 1:] if 0 <= space < TAIL // 2 else tail


def _parse(text: str) -> list[object]:
    try:
        return parse(_tail(text), parsing_timeout=_timeout())
    except (Exception, TimeoutException):  # TimeoutException derives from BaseException
        return []


@functools.lru_cache(maxsize=4096)
def _parse_gold(expected: str) -> tuple[object, ...]:
    """Gold answers repeat across a group of samples: parse each once (sympy objects are immutable)."""
    return tuple(_parse(expected))


def _parsed(items: list[object] | tuple[object, ...]) -> bool:
    """parse() appends the matched string as a fallback; only a non-string item means it was understood."""
    return any(not isinstance(x, str) for x in items)


def _is_literal(x: object) -> bool:
    """A number as one would write a final answer: 133, -5, 0.5, 1/2 (an integer over an integer); not an
    unevaluated sum or product such as the problem's own `73 + 60`."""
    if not isinstance(x, sympy.Basic):
        return False
    if x.is_Number:
        return True
    if isinstance(x, sympy.Pow):  # 1/q
        return x.base.is_Integer and x.exp == -1
    if isinstance(x, sympy.Mul) and len(x.args) == 2:  # p/q: one integer times 1/q (not p * q)
        kinds = sorted(type(a).__name__ for a in x.args)
        return any(a.is_Integer for a in x.args) and kinds.count("Pow") == 1 and all(_is_literal(a) for a in x.args)
    return False


def answers_match(reply: str, expected: str) -> bool:
    """Whether the reply's final answer equals the gold answer (numbers and expressions, via math-verify).

    When the gold answer is a number, the reply's answer must be a number too: math-verify evaluates expressions,
    so a reply that merely restates the problem ("To calculate 73 + 60, ...") would otherwise equal 133; a policy
    trained on that reward learns to restate problems instead of solving them (seen in the GRPO demo)."""
    if not reply or not expected:
        return False
    gold = list(_parse_gold(expected.strip()))
    pred = _parse(reply)
    if not gold or not pred:
        return False
    if any(_is_literal(g) for g in gold) and not any(_is_literal(x) for x in pred):
        return False
    try:
        return bool(verify(gold, pred, timeout_seconds=_timeout()))
    except (Exception, TimeoutException):
        return False


def extract_answer(reply: str) -> str | None:
    """The reply's final answer as math-verify understood it (for logging and format rewards); None when the
    reply holds no parseable answer."""
    if not reply:
        return None
    items = _parse(reply)
    if not _parsed(items):
        return None
    text = next((x for x in items if isinstance(x, str)), None)
    return text if text is not None else str(next(x for x in items if not isinstance(x, str)))
