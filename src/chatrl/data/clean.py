"""Text cleanup, empty/duplicate filtering and the `DataReport` that counts every dropped row.

Every row that leaves the pipeline went through `clean_text` (Unicode NFC, stripped, trailing spaces
removed, 3+ newlines collapsed to one blank line). Every row that does not leave it is counted in the
report under a reason, with the first few "file:line" sources, so nothing disappears silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from chatrl.errors import ChatrlError

log = logging.getLogger(__name__)

MAX_EXAMPLES = 5  # sources kept per drop reason
_MANY_NEWLINES = re.compile(r"\n{3,}")
_TRAILING_SPACES = re.compile(r"[ \t]+\n")

SCHEMA_HELP = (
    "Accepted schemas (one JSON object per row):\n"
    '  preference:      {"prompt", "chosen", "rejected"[, "margin"]}  (prompt: string or message list; '
    "chosen/rejected: strings or message lists)\n"
    '  hh:              {"chosen", "rejected"}  whole "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts\n'
    '  kto:             {"prompt", "completion", "label": true|false}  (unpaired feedback for chatrl kto)\n'
    '  chat:            {"messages": [{"role": "system|user|assistant|tool", "content": "..."}, ...]}  (optional '
    '"tools": the function schemas offered)\n'
    '  prompt_response: {"prompt", "response"}\n'
    '  alpaca:          {"instruction", "input", "output"}\n'
    '  prompt:          {"prompt"}  (prompts only, for RLHF)\n'
    "Set data.skip_bad_rows=true to skip bad rows (they are counted in the report) instead of failing."
)


@dataclass
class DataReport:
    """What happened to the rows: counts read/kept per source, drops by reason with example sources."""

    read: dict[str, int] = field(default_factory=dict)  # dataset -> rows read
    schemas: dict[str, str] = field(default_factory=dict)  # dataset -> detected schema
    kept: dict[str, int] = field(default_factory=dict)  # dataset -> rows after cleaning
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first "file:line"s
    shards: dict[str, int] = field(default_factory=dict)  # "sft/train" -> rows
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, source: str) -> None:
        """Count one dropped row under `reason`, remembering its source if among the first few."""
        self.dropped[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < MAX_EXAMPLES:
            seen.append(source)

    def bad_row(self, reason: str, source: str, message: str, skip: bool) -> None:
        """A malformed row: raise a ChatrlError naming it, or (skip=True) count it as dropped."""
        if not skip:
            raise ChatrlError(f"{source}: {message}\n{SCHEMA_HELP}")
        self.drop(reason, source)

    def merge(self, other: DataReport) -> None:
        self.read.update(other.read)
        self.schemas.update(other.schemas)
        self.kept.update(other.kept)
        self.shards.update(other.shards)
        self.notes.extend(n for n in other.notes if n not in self.notes)
        for reason, n in other.dropped.items():
            self.dropped[reason] += n
            seen = self.examples.setdefault(reason, [])
            seen.extend(other.examples.get(reason, [])[: MAX_EXAMPLES - len(seen)])

    def to_dict(self) -> dict[str, Any]:
        return {"read": self.read, "schemas": self.schemas, "kept": self.kept, "dropped": dict(self.dropped),
                "examples": self.examples, "shards": self.shards, "notes": self.notes}

    def summary(self) -> str:
        """A few human-readable lines (logged by the pipeline, printed by `chatrl data`)."""
        lines = []
        for name, n in self.read.items():
            lines.append(f"{name}: schema={self.schemas.get(name, '?')} read={n} kept={self.kept.get(name, 0)}")
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"  dropped {n} ({reason}), e.g. {', '.join(self.examples.get(reason, []))}")
        if self.shards:
            lines.append("  shards: " + ", ".join(f"{k}={v}" for k, v in self.shards.items()))
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def clean_text(text: str) -> str:
    """NFC-normalise, unify newlines, drop trailing spaces, collapse 3+ newlines to 2, strip."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_SPACES.sub("\n", text)
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def row_key(obj: Any) -> str:
    """A stable hash of a parsed example's content, for duplicate detection."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def dedupe(items: list[Any], key_of, report: DataReport, source_of) -> list[Any]:
    """Keep the first of every group of identical items (by `key_of`), counting the rest as duplicates."""
    seen: set[str] = set()
    out = []
    for item in items:
        key = key_of(item)
        if key in seen:
            report.drop("duplicate", source_of(item))
            continue
        seen.add(key)
        out.append(item)
    return out
