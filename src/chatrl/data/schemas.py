"""Schemas: recognise what a dataset's rows look like and parse each row into one `Example`.

An `Example` is the common form every schema maps to: prompt turns, an optional final reply
(`response`, the chosen one for preference data), an optional `rejected` reply, an optional `label` (KTO's
desirable / undesirable, TRL's unpaired format {prompt, completion, label}) and extra columns.
From it `pipeline.py` builds the records of `chatrl.data.types` each training step needs.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from chatrl.data.types import Conversation, LabeledCompletion, Message, PreferencePair, Prompt

SCHEMAS = ("preference", "hh", "kto", "chat", "prompt_response", "alpaca", "prompt")
PAIR_SCHEMAS = ("preference", "hh")
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "model": "assistant", "tool": "tool"}
_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_MARKERS = ("\n\nHuman:", "\n\nAssistant:")
_CONSUMED = {
    "preference": {"prompt", "chosen", "rejected", "margin"},
    "hh": {"chosen", "rejected", "margin"},
    "kto": {"prompt", "completion", "label"},
    "chat": {"messages", "conversations"},
    "prompt_response": {"prompt", "response", "completion"},
    "alpaca": {"instruction", "input", "output"},
    "prompt": {"prompt"},
}


class RowError(Exception):
    """A row that does not fit its schema; `reason` is the report key, `field` the offending column."""

    def __init__(self, reason: str, fld: str, message: str):
        super().__init__(f"field '{fld}': {message}")
        self.reason = reason
        self.field = fld


@dataclass
class Example:
    """One parsed row. `messages` are the prompt turns (for chat rows: every turn before the final
    assistant reply); `response` is that final reply (the chosen one for pairs)."""

    messages: list[Message]
    response: str | None = None
    rejected: str | None = None
    margin: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    label: bool | None = None  # kto rows: is `response` desirable

    @property
    def is_pair(self) -> bool:
        return self.rejected is not None

    @property
    def is_undesirable(self) -> bool:
        """A reply labelled bad (kto rows): never a target to imitate (SFT) or a reference answer (RLHF)."""
        return self.label is False

    def to_pair(self) -> PreferencePair:
        assert self.response is not None and self.rejected is not None
        return PreferencePair(list(self.messages), self.response, self.rejected, self.margin, self.source)

    def to_labeled(self) -> list[LabeledCompletion]:
        """KTO rows: a labelled reply as it is; a pair split into its chosen (desirable) and rejected (undesirable)
        replies; nothing for a row with neither."""
        if self.is_pair:
            assert self.response is not None and self.rejected is not None
            return [LabeledCompletion(list(self.messages), self.response, True, self.source),
                    LabeledCompletion(list(self.messages), self.rejected, False, self.source)]
        if self.label is None or self.response is None:
            return []
        return [LabeledCompletion(list(self.messages), self.response, self.label, self.source)]

    def to_conversation(self) -> Conversation:
        assert self.response is not None
        return Conversation(list(self.messages) + [{"role": "assistant", "content": self.response}], self.source,
                            tools=self.extra.get("tools"))

    def to_prompt(self) -> Prompt:
        reference = None if self.is_undesirable else self.response
        return Prompt(list(self.messages), reference, dict(self.extra), self.source)


# ----------------------------------------------------------------------------- detection


def detect_row(keys: set[str]) -> str | None:
    """The schema a row's keys fit best, or None."""
    if "chosen" in keys or "rejected" in keys:
        return "preference" if "prompt" in keys else "hh"
    if {"prompt", "completion", "label"} <= keys:
        return "kto"
    if "messages" in keys or "conversations" in keys:
        return "chat"
    if "prompt" in keys and ("response" in keys or "completion" in keys):
        return "prompt_response"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys:
        return "prompt"
    return None


def detect_schema(rows: list[dict[str, Any]], sample: int = 50) -> str | None:
    """Majority vote of `detect_row` over the first `sample` rows (None if none fits)."""
    votes = Counter(s for s in (detect_row(set(r)) for r in rows[:sample]) if s)
    return votes.most_common(1)[0][0] if votes else None


# ----------------------------------------------------------------------------- field helpers


def _text(row: dict[str, Any], key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise RowError("missing_field", key, "is missing")
        return ""
    if not isinstance(value, str):
        raise RowError("wrong_type", key, f"must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, key: str) -> list[Message]:
    """Validate a message list ({role, content} or ShareGPT {from, value}) and normalise roles."""
    if not isinstance(value, list) or not value:
        raise RowError("wrong_type", key, f"must be a non-empty list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError("wrong_type", f"{key}[{i}]", f"must be an object with role and content, got {type(m).__name__}")
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise RowError("wrong_type", f"{key}[{i}].role", f"must be one of system/user/assistant/tool, got {role!r}")
        if not isinstance(content, str):
            raise RowError("wrong_type", f"{key}[{i}].content", f"must be a string, got {type(content).__name__}")
        out.append({"role": ROLES[role.lower()], "content": content})
        if out[-1]["role"] == "tool" and isinstance(m.get("name"), str):  # a tool result's tool (templates show it)
            out[-1]["name"] = m["name"]
    return out


def parse_transcript(text: str) -> list[Message]:
    """Split an hh-rlhf "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript into messages."""
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip()
    parts = _TURN.split(text)
    if parts[0].strip():
        raise ValueError("text before the first 'Human:' turn")
    return [{"role": "user" if parts[i] == "Human" else "assistant", "content": parts[i + 1].strip()}
            for i in range(1, len(parts), 2)]


def prompt_messages(value: Any, key: str) -> list[Message]:
    """A prompt given as a plain string, an hh-style transcript string, or a message list."""
    if isinstance(value, str):
        if value.lstrip().startswith("Human:") or "\n\nHuman:" in value:
            msgs = parse_transcript(value)
            if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
                msgs = msgs[:-1]  # the open "Assistant:" the reply follows
            return msgs
        return [{"role": "user", "content": value}]
    if value is None:
        raise RowError("missing_field", key, "is missing")
    _string_or_list(value, key)
    return _messages(value, key)


def _string_or_list(value: Any, key: str) -> None:
    if not isinstance(value, (str, list)):
        raise RowError("wrong_type", key, f"must be a string or a list of messages, got {type(value).__name__}")


def _reply(row: dict[str, Any], key: str) -> tuple[str, list[Message]]:
    """A reply given as a string or as a message list ending with an assistant turn.
    Returns the reply text and any turns before it."""
    value = row.get(key)
    if value is None:
        raise RowError("missing_field", key, "is missing")
    _string_or_list(value, key)
    if isinstance(value, str):
        text, before = value, []
    else:
        msgs = _messages(value, key)
        if msgs[-1]["role"] != "assistant":
            raise RowError("wrong_type", key, "a message list must end with an assistant message")
        text, before = msgs[-1]["content"], msgs[:-1]
    if not text.strip():
        raise RowError("empty_reply", key, "the reply is empty")
    return text, before


def _margin(row: dict[str, Any]) -> float | None:
    value = row.get("margin")
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RowError("wrong_type", "margin", f"must be a number, got {value!r}") from None


# ----------------------------------------------------------------------------- per-schema parsers


def _parse_preference(row: dict[str, Any]) -> Example:
    chosen, chosen_before = _reply(row, "chosen")
    rejected, _ = _reply(row, "rejected")
    messages = chosen_before or prompt_messages(row.get("prompt"), "prompt")
    return _pair(messages, chosen, rejected, row)


def _parse_hh(row: dict[str, Any]) -> Example:
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if chosen == rejected:
        raise RowError("chosen_equals_rejected", "rejected", "is identical to 'chosen'")
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind("\n\nAssistant:")
    if cut < 0:
        raise RowError("bad_transcript", "chosen", "has no '\\n\\nAssistant:' turn shared with 'rejected'")
    end = cut + len("\n\nAssistant:")
    try:
        messages = parse_transcript(chosen[:end])[:-1]
    except ValueError as e:
        raise RowError("bad_transcript", "chosen", str(e)) from None
    replies = {"chosen": chosen[end:].strip(), "rejected": rejected[end:].strip()}
    for key, reply in replies.items():
        if not reply:
            raise RowError("empty_reply", key, "the final assistant reply is empty")
        if any(m in reply for m in _HH_MARKERS):
            raise RowError("bad_transcript", key, "chosen and rejected transcripts differ before the last turn")
    return _pair(messages, replies["chosen"], replies["rejected"], row)


def _pair(messages: list[Message], chosen: str, rejected: str, row: dict[str, Any]) -> Example:
    if chosen.strip() == rejected.strip():
        raise RowError("chosen_equals_rejected", "rejected", "is identical to 'chosen'")
    return Example(messages, chosen, rejected, _margin(row))


_LABELS = {True: True, False: False, "true": True, "false": False}  # ints 1 / 0 hash as True / False: also taken


def _parse_kto(row: dict[str, Any]) -> Example:
    """TRL's unpaired format: {"prompt": text or messages, "completion": text or messages, "label": bool}."""
    completion, before = _reply(row, "completion")
    messages = prompt_messages(row.get("prompt"), "prompt") + before
    value = row.get("label")
    key = value.strip().lower() if isinstance(value, str) else value
    if value is None:
        raise RowError("missing_field", "label", "is missing")
    if not isinstance(key, (bool, int, str)) or key not in _LABELS:  # 1.0 == 1, but a float label is a mistake
        raise RowError("wrong_type", "label", f"must be true (desirable) or false (undesirable), got {value!r}")
    return Example(messages, completion, label=_LABELS[key])


def _parse_chat(row: dict[str, Any]) -> Example:
    key = "messages" if "messages" in row else "conversations"
    msgs = _messages(row.get(key), key)
    tools = row.get("tools")  # optional: the function schemas offered (kept in `extra`, rendered with the template)
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise RowError("wrong_type", "tools", f"must be a list of function schemas (objects), got {str(tools)[:60]}")
    if msgs[-1]["role"] == "assistant":
        return Example(msgs[:-1], msgs[-1]["content"])
    return Example(msgs)  # no final reply: usable as an RLHF prompt only


def _parse_prompt_response(row: dict[str, Any]) -> Example:
    key = "response" if "response" in row else "completion"
    return Example(prompt_messages(row.get("prompt"), "prompt"), _text(row, key))


def _parse_alpaca(row: dict[str, Any]) -> Example:
    instruction, extra_input = _text(row, "instruction"), _text(row, "input", required=False)
    prompt = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    return Example([{"role": "user", "content": prompt}], _text(row, "output"))


def _parse_prompt(row: dict[str, Any]) -> Example:
    return Example(prompt_messages(row.get("prompt"), "prompt"))


PARSERS = {"preference": _parse_preference, "hh": _parse_hh, "kto": _parse_kto, "chat": _parse_chat,
           "prompt_response": _parse_prompt_response, "alpaca": _parse_alpaca, "prompt": _parse_prompt}


def parse_row(schema: str, row: dict[str, Any], source: str) -> Example:
    """Parse one row with `schema`; raises RowError naming the field. Unused columns go to `extra`."""
    ex = PARSERS[schema](row)
    ex.source = source
    ex.extra = {k: v for k, v in row.items() if k not in _CONSUMED[schema]}
    return ex
