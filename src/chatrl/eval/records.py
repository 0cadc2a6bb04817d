"""A minimal JSONL reader for evaluation files (isolated so the data pipeline's loader can replace it).

Accepted line forms:
- `{"prompt": str | messages, "reference": optional str}`             -> Prompt
- `{"prompt": ..., "response": str}` or `{"messages": [..., assistant]}` -> Conversation (prompt + one reply)
- `{"chosen": str, "rejected": str}` in hh-rlhf form ("\\n\\nHuman: ...\\n\\nAssistant: ...") or with a
  separate `"prompt"` and bare replies                                    -> PreferencePair
"""

from __future__ import annotations

import json
from pathlib import Path

from chatrl.data.schemas import RowError, parse_row, prompt_messages
from chatrl.data.types import Conversation, Message, PreferencePair, Prompt
from chatrl.errors import ChatrlError

Record = Prompt | Conversation | PreferencePair
_ROLES = {"system", "user", "assistant"}


def read_records(path: str | Path, limit: int | None = None, skip_bad: bool = False,
                 log=None) -> list[Record]:
    """Read up to `limit` records from a JSONL file; errors name the file and line. With `skip_bad`, a malformed
    line is skipped instead, and `log` (if given) gets one message with the count and the first reason."""
    path = Path(path)
    skipped: list[str] = []
    if not path.is_file():
        raise ChatrlError(f"data file not found: {path}")
    records: list[Record] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                records.append(_parse_line(line, f"{path}:{lineno}"))
            except ChatrlError as e:
                if not skip_bad:
                    raise
                skipped.append(str(e))
    if skipped and log is not None:
        log(f"{path}: skipped {len(skipped)} bad line(s); first: {skipped[0]}")
    if not records:
        raise ChatrlError(f"{path}: no records found (expected JSONL lines with a 'prompt' or 'chosen'/'rejected')")
    return records


def _parse_line(line: str, where: str) -> Record:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ChatrlError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from e
    if not isinstance(row, dict):
        raise ChatrlError(f"{where}: expected a JSON object per line")
    return _parse_row(row, where)


def as_prompts(records: list[Record]) -> list[Prompt]:
    """View any record as a prompt; a pair's chosen reply (or a conversation's last reply) becomes the reference."""
    out = []
    for r in records:
        if isinstance(r, Prompt):
            out.append(r)
        elif isinstance(r, PreferencePair):
            out.append(Prompt(messages=r.prompt_messages, reference=r.chosen, source=r.source))
        else:
            out.append(Prompt(messages=r.messages[:-1], reference=r.messages[-1]["content"], source=r.source))
    return out


def parse_hh_dialogue(text: str) -> list[Message]:
    """Split hh-rlhf text "\\n\\nHuman: a\\n\\nAssistant: b..." into messages (the data pipeline's parser;
    a trailing open "Assistant:" is dropped)."""
    try:
        return prompt_messages(text, "prompt")
    except (RowError, ValueError) as e:
        raise ChatrlError(f"not an hh-rlhf dialogue: {e}") from None


def split_hh_pair(chosen: str, rejected: str, where: str) -> tuple[list[Message], str, str]:
    """Prompt = the common prefix up to its last "\\n\\nAssistant:"; the rest of each text is the reply
    (the data pipeline's hh schema, so eval files and training data split pairs the same way)."""
    try:
        ex = parse_row("hh", {"chosen": chosen, "rejected": rejected}, where)
    except RowError as e:
        raise ChatrlError(f"{where}: {e}; expected hh-rlhf dialogues that differ only in the final assistant "
                          "reply") from None
    return ex.messages, ex.response or "", ex.rejected or ""


def _parse_row(row: dict, where: str) -> Record:
    if "chosen" in row and "rejected" in row:
        chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
        if "prompt" in row:
            return PreferencePair(_messages(row["prompt"], where), chosen, rejected, source=where)
        messages, chosen, rejected = split_hh_pair(chosen, rejected, where)
        return PreferencePair(messages, chosen, rejected, source=where)
    if "messages" in row:
        messages = _messages(row["messages"], where)
        if messages[-1]["role"] == "assistant":
            return Conversation(messages, source=where)
        return Prompt(messages, reference=row.get("reference"), source=where)
    if "prompt" in row:
        messages = _messages(row["prompt"], where)
        if "response" in row:
            return Conversation(messages + [{"role": "assistant", "content": _text(row, "response", where)}],
                                source=where)
        ref = row.get("reference")
        if ref is not None and not isinstance(ref, str):
            raise ChatrlError(f"{where}: 'reference' must be a string")
        return Prompt(messages, reference=ref, source=where)
    raise ChatrlError(f"{where}: unknown record; expected a 'prompt' key (optionally 'reference' or 'response'), "
                      f"'messages', or 'chosen' + 'rejected' (got keys: {sorted(row)})")


def _text(row: dict, key: str, where: str) -> str:
    if not isinstance(row[key], str):
        raise ChatrlError(f"{where}: '{key}' must be a string")
    return row[key]


def _messages(value: object, where: str) -> list[Message]:
    if isinstance(value, str):
        return parse_hh_dialogue(value) if value.lstrip().startswith("Human:") else [
            {"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ChatrlError(f"{where}: a prompt must be a string or a non-empty list of messages")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str)):
            raise ChatrlError(f"{where}: message {i} must be {{'role': system|user|assistant, 'content': str}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]
