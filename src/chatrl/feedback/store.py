"""Operations on the feedback database: users and keys, recording completions, feedback events, reading back.

Every method opens its own session and commits before returning: a caller that got an answer knows the write is
on disk (the server acknowledges feedback only then). Methods are blocking; the server calls them on a thread.
Public ids: a reply is named by its completion id (`chatcmpl-...`, choice i > 0 of an n-choice request:
`chatcmpl-...:i`), the prompt it answers by `msg-N` (the last prompt message), a conversation by `conv-N`.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from chatrl.errors import ChatrlError
from chatrl.feedback.db import Conversation, Database, Feedback, Message, User, utcnow

LOCAL_USER = "local"
KEY_PREFIX = "sk-chatrl-"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,99}")
CANDIDATES = 20  # stored replies with the same text checked when finding the conversation a request continues


class StoreError(ChatrlError):
    """A request the store refuses: `status` 404 (unknown or not yours) or 400 (inconsistent), `code` for the API."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class UserInfo:
    id: int
    name: str
    is_admin: bool


@dataclass(frozen=True)
class Reply:
    """One generated choice to store."""

    completion_id: str
    text: str
    finish_reason: str | None
    model_name: str | None = None  # who wrote it, when not the request's model (an arena pair: two models)
    version: str | None = None


@dataclass(frozen=True)
class Recorded:
    conversation_id: str
    prompt_id: str


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def public_message_id(message_id: int) -> str:
    return f"msg-{message_id}"


def parse_prefixed(value: str, prefix: str, what: str) -> int:
    """`msg-12` -> 12; anything else is an unknown id (404), never a query fragment."""
    tail = value.removeprefix(prefix)
    if value.startswith(prefix) and tail.isdigit() and tail.isascii() and len(tail) < 18:
        return int(tail)
    raise StoreError(404, f"no {what} {value[:100]!r}", "not_found")


class FeedbackStore:
    def __init__(self, db: Database):
        self.db = db

    # ------------------------------------------------------------------------------------------- users

    def add_user(self, name: str, admin: bool = False) -> str:
        """Create a user; returns the new API key (shown once: only its hash is stored)."""
        if not NAME_PATTERN.fullmatch(name) or name == LOCAL_USER:
            raise ChatrlError(f"user name {name!r}: expected 1-100 letters, digits, '.', '_', '@' or '-', starting "
                              f"with a letter or digit (and not {LOCAL_USER!r}, the no-users account)")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            with self.db.write() as s, s.begin():
                s.add(User(name=name, key_hash=sha256(key), is_admin=admin))
        except IntegrityError:
            raise ChatrlError(f"user {name!r} already exists in {self.db.url}") from None
        return key

    def users(self) -> list[dict[str, Any]]:
        with self.db.session() as s:
            rows = s.scalars(select(User).order_by(User.id)).all()
            return [{"name": u.name, "admin": u.is_admin, "has_key": u.key_hash is not None,
                     "created": u.created.isoformat()} for u in rows]

    def has_users(self) -> bool:
        """True once any user with a key exists: from then on every request needs a key."""
        with self.db.session() as s:
            return s.scalar(select(User.id).where(User.key_hash.is_not(None)).limit(1)) is not None

    def authenticate(self, key: str) -> UserInfo | None:
        if not key:
            return None
        with self.db.session() as s:
            user = s.scalar(select(User).where(User.key_hash == sha256(key)))
            return UserInfo(user.id, user.name, user.is_admin) if user else None

    def local_user(self) -> UserInfo:
        """The one user of a server without users (created on first use; admin: it sees everything)."""
        try:
            with self.db.write() as s, s.begin():
                user = s.scalar(select(User).where(User.name == LOCAL_USER))
                if user is None:
                    user = User(name=LOCAL_USER, key_hash=None, is_admin=True)
                    s.add(user)
                    s.flush()
                return UserInfo(user.id, user.name, user.is_admin)
        except IntegrityError:  # another process made it first
            return self.local_user()

    # ------------------------------------------------------------------------------------------- completions

    def record_completion(self, user: UserInfo, messages: list[dict[str, str]], replies: list[Reply], *,
                          model_name: str, version: str, sampling: dict[str, Any],
                          conversation: str | None = None) -> Recorded:
        """Store the prompt messages (reusing the conversation they continue) and the generated replies."""
        with self.db.write() as s, s.begin():
            conv, parent = self._prompt_chain(s, user, messages, conversation)
            settings = json.dumps(sampling, sort_keys=True)
            for reply in replies:
                s.add(Message(conversation_id=conv.id, parent_id=parent.id, role="assistant", content=reply.text,
                              content_hash=sha256(reply.text), model_name=reply.model_name or model_name,
                              model_version=reply.version or version,
                              sampling=settings, completion_id=reply.completion_id,
                              finish_reason=reply.finish_reason))
            conv.updated = utcnow()
            return Recorded(f"conv-{conv.id}", public_message_id(parent.id))

    def _prompt_chain(self, s: Session, user: UserInfo, messages: list[dict[str, str]],
                      conversation: str | None) -> tuple[Conversation, Message]:
        """The conversation and the stored message the replies follow (the request's last message)."""
        if conversation is not None:
            conv, parent, start = self._own_conversation(s, user, conversation), None, 0
        else:
            conv, parent, start = self._continued(s, user, messages)
            if conv is None:
                conv = Conversation(user_id=user.id)
                s.add(conv)
                s.flush()
        for m in messages[start:]:
            parent = self._child(s, conv.id, parent, m)
        assert parent is not None  # a request has at least one message
        return conv, parent

    def check_conversation(self, user: UserInfo, conversation: str) -> None:
        """404 unless `conversation` (`conv-N`) is one of `user`'s (checked before generating a reply for it)."""
        with self.db.session() as s:
            self._own_conversation(s, user, conversation)

    @staticmethod
    def _own_conversation(s: Session, user: UserInfo, conversation: str) -> Conversation:
        conv = s.get(Conversation, parse_prefixed(conversation, "conv-", "conversation"))
        if conv is None or conv.user_id != user.id:
            raise StoreError(404, f"no conversation {conversation[:100]!r} among yours", "not_found")
        return conv

    def _continued(self, s: Session, user: UserInfo,
                   messages: list[dict[str, str]]) -> tuple[Conversation | None, Message | None, int]:
        """A request that carries a stored reply (its latest assistant message) continues that reply's
        conversation when every message before it matches the stored chain."""
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return None, None, 0
        found = s.scalars(select(Message).join(Conversation).where(
            Conversation.user_id == user.id, Message.role == "assistant",
            Message.content_hash == sha256(messages[last]["content"])).order_by(Message.id.desc()).limit(CANDIDATES))
        for candidate in found:
            if [_turn(m) for m in self.chain(s, candidate)] == [_turn(m) for m in messages[:last + 1]]:
                return s.get(Conversation, candidate.conversation_id), candidate, last + 1
        return None, None, 0

    @staticmethod
    def _child(s: Session, conversation_id: int, parent: Message | None, m: dict[str, str]) -> Message:
        parent_id = parent.id if parent else None
        same = select(Message).where(Message.conversation_id == conversation_id, Message.role == m["role"],
                                     Message.content_hash == sha256(m["content"]),
                                     Message.parent_id.is_(None) if parent_id is None
                                     else Message.parent_id == parent_id)
        found = s.scalars(same.limit(1)).first()
        if found is not None:
            return found
        child = Message(conversation_id=conversation_id, parent_id=parent_id, role=m["role"], content=m["content"],
                        content_hash=sha256(m["content"]))
        s.add(child)
        s.flush()
        return child

    @staticmethod
    def chain(s: Session, message: Message) -> list[Message]:
        """`message` and every message above it, oldest first."""
        out = [message]
        while out[-1].parent_id is not None:
            out.append(s.get(Message, out[-1].parent_id))
        return out[::-1]

    # ------------------------------------------------------------------------------------------- feedback

    def add_rating(self, user: UserInfo, completion_id: str, rating: int, comment: str | None) -> str:
        with self.db.write() as s, s.begin():
            reply = self._own_reply(s, user, completion_id, "completion_id")
            return self._add(s, Feedback(user_id=user.id, kind="rating", message_id=reply.id, rating=rating,
                                         comment=comment))

    def add_edit(self, user: UserInfo, completion_id: str, edited: str) -> str:
        with self.db.write() as s, s.begin():
            reply = self._own_reply(s, user, completion_id, "completion_id")
            if edited.strip() == reply.content.strip():
                raise StoreError(400, "'edited' is the reply unchanged: nothing to learn from", "invalid_value")
            return self._add(s, Feedback(user_id=user.id, kind="edit", message_id=reply.id, edited=edited))

    def add_pair(self, user: UserInfo, prompt_id: str, chosen_id: str, rejected_id: str) -> str:
        with self.db.write() as s, s.begin():
            prompt = parse_prefixed(prompt_id, "msg-", "prompt")
            chosen = self._own_reply(s, user, chosen_id, "chosen_id")
            rejected = self._own_reply(s, user, rejected_id, "rejected_id")
            if chosen.id == rejected.id:
                raise StoreError(400, "chosen_id and rejected_id name the same reply", "invalid_value")
            if chosen.parent_id != prompt or rejected.parent_id != prompt:
                raise StoreError(400, f"chosen_id and rejected_id must both be replies to prompt_id {prompt_id!r} "
                                      f"(the prompt_id returned with each completion)", "invalid_value")
            return self._add(s, Feedback(user_id=user.id, kind="pair", prompt_id=prompt, chosen_id=chosen.id,
                                         rejected_id=rejected.id))

    def reveal(self, user: UserInfo, completion_ids: list[str]) -> list[dict[str, str | None]]:
        """The model name and version that wrote each of `user`'s replies (the arena shows them after the choice)."""
        with self.db.session() as s:
            replies = [self._own_reply(s, user, cid, "completion_id") for cid in completion_ids]
            return [{"completion_id": r.completion_id, "model": r.model_name, "model_version": r.model_version}
                    for r in replies]

    @staticmethod
    def _add(s: Session, event: Feedback) -> str:
        s.add(event)
        s.flush()
        return f"fb-{event.id}"

    @staticmethod
    def _own_reply(s: Session, user: UserInfo, completion_id: str, field: str) -> Message:
        """The stored reply with this completion id, if it is in one of `user`'s conversations (else 404: another
        user's ids are not revealed to exist)."""
        reply = s.scalar(select(Message).where(Message.completion_id == completion_id))
        owner = s.get(Conversation, reply.conversation_id).user_id if reply is not None else None
        if reply is None or owner != user.id:
            raise StoreError(404, f"{field}: no completion {completion_id[:100]!r} in your conversations",
                             "not_found")
        return reply

    # ------------------------------------------------------------------------------------------- reading

    def conversations(self, user: UserInfo | None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest conversations of `user` (None: everyone's) with their messages (tree order by id)."""
        with self.db.session() as s:
            query = select(Conversation, User.name).join(User).order_by(Conversation.updated.desc()).limit(limit)
            if user is not None:
                query = query.where(Conversation.user_id == user.id)
            out = []
            for conv, name in s.execute(query).all():
                msgs = s.scalars(select(Message).where(Message.conversation_id == conv.id).order_by(Message.id))
                out.append({"id": f"conv-{conv.id}", "object": "conversation", "user": name,
                            "created": conv.created.isoformat(), "updated": conv.updated.isoformat(),
                            "messages": [_message_json(m) for m in msgs]})
            return out

    def counts(self) -> dict[str, int]:
        with self.db.session() as s:
            return {table.__tablename__: s.scalar(select(func.count()).select_from(table))
                    for table in (User, Conversation, Message, Feedback)}


def _turn(m: Message | dict[str, str]) -> tuple[str, str]:
    return (m.role, m.content) if isinstance(m, Message) else (m["role"], m["content"])


def _message_json(m: Message) -> dict[str, Any]:
    return {"id": public_message_id(m.id), "parent_id": public_message_id(m.parent_id) if m.parent_id else None,
            "role": m.role, "content": m.content, "completion_id": m.completion_id, "model": m.model_name,
            "model_version": m.model_version, "created": m.created.isoformat()}
