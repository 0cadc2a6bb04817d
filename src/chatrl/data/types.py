"""Records that leave the data pipeline. Messages are `{"role": ..., "content": ...}` dicts with
roles system / user / assistant, ready for `tokenizer.apply_chat_template`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]


@dataclass
class Conversation:
    """A full conversation for SFT; the loss falls on assistant turns."""

    messages: list[Message]
    source: str = ""  # "file:line" for error messages and provenance
    tools: list[dict[str, Any]] | None = None  # function schemas offered in it (rendered by the chat template)


@dataclass
class PreferencePair:
    """Shared prompt turns plus two alternative final assistant replies."""

    prompt_messages: list[Message]
    chosen: str
    rejected: str
    margin: float | None = None  # optional preference strength from the data
    source: str = ""


@dataclass
class LabeledCompletion:
    """KTO's unpaired feedback: prompt turns and one final assistant reply labelled desirable (thumbs up) or not.
    A preference pair gives two: its chosen reply desirable, its rejected one undesirable."""

    prompt_messages: list[Message]
    completion: str
    desirable: bool
    source: str = ""


@dataclass
class Prompt:
    """Prompt turns for RLHF rollouts; `reference` is a known good reply (for BLEU/ROUGE) when the data has one;
    `extra` carries any other dataset columns to Python reward functions."""

    messages: list[Message]
    reference: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""
