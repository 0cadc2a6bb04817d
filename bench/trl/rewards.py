"""The GRPO benchmark's rule reward, one function for both systems (no imports: it loads in either venv).

chatrl calls it as `fn(prompts=..., responses=[str], **columns)` (`reward.functions=[<this file>:length_mod]`);
TRL's GRPOTrainer as `fn(prompts=..., completions=[str | messages], **kwargs)`. It is cheap on purpose (the
benchmark times the trainers, not the reward) and varies within a group, so advantages are not all zero.
"""

from __future__ import annotations

from typing import Any


def _text(c: Any) -> str:
    """A completion as text: TRL gives conversational completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        return str(c[-1].get("content", ""))
    return str(c)


def length_mod(prompts: list[Any], responses: list[str] | None = None, completions: list[Any] | None = None,
               **kwargs: Any) -> list[float]:
    """(characters of the reply mod 7) / 6, in [0, 1]."""
    replies = responses if responses is not None else completions or []
    return [(len(_text(r)) % 7) / 6.0 for r in replies]
