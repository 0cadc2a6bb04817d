"""Feedback as training data, one JSONL row per example.

- `pairs`: chatrl's `preference` schema, `{"prompt": [messages], "chosen": str, "rejected": str}`, which `chatrl
  dpo` and `chatrl reward` read: a regenerate choice (the chosen reply against the one not chosen) and an edit (the
  user's text chosen against the model's reply).
- `kto`: `{"prompt": [messages], "completion": str, "label": bool}`: a thumbs up (true) or down (false).
- `sft`: chatrl's `chat` schema, `{"messages": [..., {"role": "assistant", ...}]}`: the replies rated up.

Later feedback replaces earlier feedback by the same user on the same thing (a changed mind: the newest rating of a
reply, the newest choice between the same two replies, the newest edit); then rows with the same content are
written once, whoever gave them. Filters: the model version that wrote the reply (for pairs the rejected reply:
the model being corrected), feedback time (`since`), the user who gave it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from tqdm import tqdm

from chatrl.errors import ChatrlError
from chatrl.feedback.db import Conversation, Database, Feedback, Message, User
from chatrl.feedback.store import FeedbackStore
from chatrl.paths import atomic_write

FORMATS = ("pairs", "kto", "sft")
KINDS = {"pairs": ("pair", "edit"), "kto": ("rating",), "sft": ("rating",)}


@dataclass
class Filters:
    model_version: str | None = None
    since: datetime | None = None
    user: str | None = None  # the name of the user who gave the feedback


@dataclass
class ExportResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    events: int = 0  # feedback events read (after the time and user filters)
    superseded: int = 0  # replaced by the same user's later feedback on the same thing
    other_version: int = 0
    duplicates: int = 0
    unusable: int = 0  # e.g. a pair whose two replies have the same text


def parse_since(text: str) -> datetime:
    """An ISO date or date-time (UTC), e.g. 2026-12-01 or 2026-12-01T08:00."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ChatrlError(f"--since {text!r}: expected an ISO date or time such as 2026-12-01 or "
                          f"2026-12-01T08:00:00") from None
    return when.replace(tzinfo=None) if when.tzinfo is None else when.astimezone(UTC).replace(tzinfo=None)


def export_rows(db: Database, fmt: str, filters: Filters | None = None, progress: bool = False) -> ExportResult:
    """The rows of format `fmt` from the feedback matching `filters` (`progress`: a tqdm bar on stderr)."""
    if fmt not in FORMATS:
        raise ChatrlError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    filters = filters or Filters()
    result = ExportResult()
    with db.session() as s:
        events = _events(s, KINDS[fmt], filters)
        result.events = len(events)
        latest = _latest(events)
        result.superseded = len(events) - len(latest)
        seen: set[str] = set()
        for event in tqdm(latest, desc=f"export {fmt}", unit="event", disable=not progress):
            made = _row(s, fmt, event, filters, result)
            if made is None:
                continue
            key = json.dumps(made, sort_keys=True, ensure_ascii=False)
            if key in seen:
                result.duplicates += 1
                continue
            seen.add(key)
            result.rows.append(made)
    return result


def _events(s: Session, kinds: Iterable[str], filters: Filters) -> list[Feedback]:
    query = select(Feedback).where(Feedback.kind.in_(list(kinds))).order_by(Feedback.id)
    if filters.since is not None:
        query = query.where(Feedback.created >= filters.since)
    if filters.user is not None:
        query = query.join(User, User.id == Feedback.user_id).where(User.name == filters.user)
    return list(s.scalars(query))


def _latest(events: list[Feedback]) -> list[Feedback]:
    """The newest event per (user, what it is about); events come oldest first."""
    newest: dict[tuple, Feedback] = {}
    for e in events:
        about = (frozenset((e.chosen_id, e.rejected_id)), e.prompt_id) if e.kind == "pair" else e.message_id
        newest[(e.user_id, e.kind, about)] = e
    return sorted(newest.values(), key=lambda e: e.id)


def _row(s: Session, fmt: str, e: Feedback, filters: Filters, result: ExportResult) -> dict[str, Any] | None:
    if e.kind == "pair":
        reply, chosen = s.get(Message, e.rejected_id), s.get(Message, e.chosen_id).content
    else:
        reply = s.get(Message, e.message_id)
        chosen = e.edited if e.kind == "edit" else reply.content
    if filters.model_version is not None and reply.model_version != filters.model_version:
        result.other_version += 1
        return None
    prompt = _prompt(s, reply)
    if fmt == "pairs":
        if not chosen.strip() or chosen.strip() == reply.content.strip():
            result.unusable += 1  # the preference reader refuses these rows
            return None
        return {"prompt": prompt, "chosen": chosen, "rejected": reply.content}
    if fmt == "kto":
        return {"prompt": prompt, "completion": reply.content, "label": e.rating > 0}
    if e.rating <= 0 or not reply.content.strip():
        return None  # sft: only liked replies
    return {"messages": [*prompt, {"role": "assistant", "content": reply.content}]}


def _prompt(s: Session, reply: Message) -> list[dict[str, str]]:
    parent = s.get(Message, reply.parent_id)
    return [{"role": m.role, "content": m.content} for m in FeedbackStore.chain(s, parent)]


def write_jsonl(rows: list[dict[str, Any]], out: str | Path) -> Path:
    """One JSON object a line (UTF-8, not ASCII-escaped), written atomically."""
    return atomic_write(out, jsonl(rows))


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# ----------------------------------------------------------------------------- stats

Table = tuple[list[str], list[list[Any]]]


def stats(db: Database) -> dict[str, Table]:
    """Counts for `chatrl feedback stats`: replies and feedback per model version, per rating, per user. A pair
    counts for the version of its rejected reply (the model being corrected), as in `export_rows`."""
    with db.session() as s:
        replies = s.execute(select(Message.model_version, Message.model_name, func.count())
                            .where(Message.completion_id.is_not(None))
                            .group_by(Message.model_version, Message.model_name)).all()
        about = func.coalesce(Feedback.message_id, Feedback.rejected_id)
        events = s.execute(select(Feedback.kind, Feedback.rating, Message.model_version, User.name, func.count())
                           .join(Message, Message.id == about).join(User, User.id == Feedback.user_id)
                           .group_by(Feedback.kind, Feedback.rating, Message.model_version, User.name)).all()
        users = s.execute(select(User.name, User.is_admin, func.count(Conversation.id))
                          .outerjoin(Conversation, Conversation.user_id == User.id)
                          .group_by(User.id).order_by(User.id)).all()
    per_version: dict[str, Counter] = {v or "unknown": Counter() for v, _, _ in replies}
    per_user: dict[str, Counter] = {name: Counter() for name, _, _ in users}
    per_rating: Counter = Counter()
    for kind, rating, version, user, count in events:
        label = {1: "up", -1: "down"}.get(rating, kind) if kind == "rating" else kind
        per_version.setdefault(version or "unknown", Counter())[label] += count
        per_user.setdefault(user, Counter())[label] += count
        if kind == "rating":
            per_rating[rating] += count
    columns = ["up", "down", "pair", "edit"]
    return {
        "per model version": (["model version", "model", "replies", *columns],
                              [[v or "unknown", name, n, *(per_version[v or "unknown"][c] for c in columns)]
                               for v, name, n in replies]),
        "per rating": (["rating", "events"], [[f"{r:+d}", n] for r, n in sorted(per_rating.items(), reverse=True)]),
        "per user": (["user", "admin", "conversations", *columns],
                     [[name, "yes" if admin else "", convs, *(per_user[name][c] for c in columns)]
                      for name, admin, convs in users]),
    }
