"""The server side of the feedback store (`chatrl serve --db FILE`).

- `UserGate`: who is asking. Once the database has users, every API request needs `Authorization: Bearer KEY` of
  one of them (401 otherwise); before that, requests run as the one local user (and `--api-key`, if given, still
  guards the server). An admin key sees everyone's conversations.
- `Recorder`: stores each completion with its conversation on ONE writer thread (one writer at a time is what
  SQLite allows; the event loop never waits on the disk, so streams keep flowing while a write commits).
- `POST /v1/feedback` (answered 200 only after the commit), `GET /v1/conversations`, `GET /v1/feedback/export`.

A comment or an edited reply longer than `MAX_TEXT_CHARS` is refused with 413; any other text is stored verbatim
(HTML and SQL are data here: every query is parameterised, and the page renders text, never HTML).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator

from chatrl.feedback.db import open_db
from chatrl.feedback.export import FORMATS, Filters, export_rows, jsonl
from chatrl.feedback.store import FeedbackStore, Reply, StoreError, UserInfo
from chatrl.serve import schemas
from chatrl.serve.generation import SamplingSettings
from chatrl.serve.server import ApiError, read_json_body

MAX_TEXT_CHARS = 100_000
Id = Annotated[StrictStr, Field(min_length=1, max_length=100)]


class FeedbackBody(BaseModel):
    """A rating `{completion_id, rating: 1|-1, comment?}`, a pair `{prompt_id, chosen_id, rejected_id}` or an edit
    `{completion_id, edited}`."""

    model_config = ConfigDict(extra="forbid")
    completion_id: Id | None = None
    rating: StrictInt | None = None
    comment: StrictStr | None = None
    prompt_id: Id | None = None
    chosen_id: Id | None = None
    rejected_id: Id | None = None
    edited: StrictStr | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> FeedbackBody:
        pair = (self.prompt_id, self.chosen_id, self.rejected_id)
        if self.rating is not None and self.rating not in (1, -1):
            raise ValueError("rating must be 1 (thumbs up) or -1 (thumbs down)")
        kinds = [k for k, given in (("rating", self.rating is not None), ("edit", self.edited is not None),
                                    ("pair", any(x is not None for x in pair))) if given]
        if len(kinds) != 1:
            raise ValueError("send one of: {completion_id, rating, comment?}, {prompt_id, chosen_id, rejected_id} "
                             "or {completion_id, edited}")
        if kinds[0] == "pair" and (None in pair or self.completion_id is not None):
            raise ValueError("a pair needs prompt_id, chosen_id and rejected_id (and no completion_id)")
        if kinds[0] != "pair" and self.completion_id is None:
            raise ValueError(f"a{'n' if kinds[0] == 'edit' else ''} {kinds[0]} needs completion_id")
        if self.comment is not None and kinds[0] != "rating":
            raise ValueError("comment goes with a rating")
        if self.edited is not None and not self.edited.strip():
            raise ValueError("edited is empty")
        return self

    @property
    def kind(self) -> Literal["rating", "pair", "edit"]:
        return "rating" if self.rating is not None else "edit" if self.edited is not None else "pair"


class Recorder:
    """The store, its writer thread, and what the served model is called."""

    def __init__(self, store: FeedbackStore, model_name: str):
        self.store, self.model_name = store, model_name
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="chatrl-db-writer")

    async def write(self, fn, *args, **kwargs) -> Any:
        """`fn(*args)` on the writer thread; returns once it has committed."""
        return await asyncio.get_running_loop().run_in_executor(self.writer, functools.partial(fn, *args, **kwargs))

    async def on_done(self, user: UserInfo, req: schemas.ChatRequest, settings: SamplingSettings, version: str):
        """The callback that stores this request's completion; a `conversation_id` is checked now, before the
        reply is generated."""
        if req.conversation_id is not None:
            await asyncio.to_thread(self.store.check_conversation, user, req.conversation_id)
        sampling = {"temperature": settings.temperature, "top_p": settings.top_p, "seed": settings.seed,
                    "max_tokens": settings.max_new_tokens, "stop": list(settings.stop), "n": req.n or 1}
        return functools.partial(self.record, user, req.template_messages(), sampling=sampling,
                                 conversation=req.conversation_id, version=version)

    async def record(self, user: UserInfo, messages: list[dict[str, str]], cid: str, texts: list[str],
                     finish: list[str | None], sampling: dict[str, Any], conversation: str | None,
                     version: str) -> dict[str, Any]:
        """Store one finished completion; returns the fields added to its response (ids to send feedback with)."""
        ids = completion_ids(cid, len(texts))
        replies = [Reply(i, t, f) for i, t, f in zip(ids, texts, finish, strict=True)]
        done = await self.write(self.store.record_completion, user, messages, replies, model_name=self.model_name,
                                version=version, sampling=sampling, conversation=conversation)
        return {"conversation_id": done.conversation_id, "prompt_id": done.prompt_id, "completion_ids": ids,
                "model_version": version}

    def close(self) -> None:
        self.writer.shutdown(wait=True)  # the last writes commit before the process exits
        self.store.db.close()


def open_recorder(db: str, model_name: str) -> Recorder:
    """The store at `db` and a recorder for the model served as `model_name`."""
    return Recorder(FeedbackStore(open_db(db)), model_name)


def completion_ids(cid: str, n: int) -> list[str]:
    """Choice 0 is the response id; choice i > 0 of an n-choice response is `id:i`."""
    return [cid if i == 0 else f"{cid}:{i}" for i in range(n)]


class UserGate:
    """A FastAPI dependency: sets `request.state.user` or answers 401."""

    def __init__(self, store: FeedbackStore, api_key: str | None):
        self.store, self.api_key = store, api_key
        self.local = store.local_user()

    async def __call__(self, request: Request) -> None:
        given = request.headers.get("authorization", "").strip()
        key = given.removeprefix("Bearer ").strip() if given.startswith("Bearer ") else ""
        request.state.user = await asyncio.to_thread(self.who, key)

    def who(self, key: str) -> UserInfo:
        shared = bool(self.api_key) and hmac.compare_digest(key.encode(), self.api_key.encode())
        if self.store.has_users():
            user = self.store.authenticate(key)
            if user is not None:
                return user
            if not shared:
                raise ApiError(401, "missing or unknown API key: send 'Authorization: Bearer <key>' with the key "
                                    "`chatrl users add` printed", code="invalid_api_key")
        elif self.api_key and not shared:
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (the key given to "
                                "chatrl serve --api-key)", code="invalid_api_key")
        return self.local


def install(app: FastAPI, recorder: Recorder, auth: list[Any]) -> None:
    """Add the feedback routes and the store's error answers to `app`."""
    store = recorder.store

    @app.exception_handler(StoreError)
    async def store_error(_: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse(schemas.error_body(str(exc), code=exc.code), status_code=exc.status)

    @app.post("/v1/feedback", dependencies=auth)
    async def feedback(request: Request) -> dict[str, Any]:
        body = await _feedback_body(request)
        user = request.state.user
        if body.kind == "rating":
            fid = await recorder.write(store.add_rating, user, body.completion_id, body.rating, body.comment)
        elif body.kind == "edit":
            fid = await recorder.write(store.add_edit, user, body.completion_id, body.edited)
        else:
            fid = await recorder.write(store.add_pair, user, body.prompt_id, body.chosen_id, body.rejected_id)
            # who wrote each reply: an arena page names the two models only now, after the choice
            models = await asyncio.to_thread(store.reveal, user, [body.chosen_id, body.rejected_id])
            return {"id": fid, "object": "feedback", "kind": body.kind, "stored": True, "models": models}
        return {"id": fid, "object": "feedback", "kind": body.kind, "stored": True}

    @app.get("/v1/conversations", dependencies=auth)
    async def conversations(request: Request, all: bool = False, limit: int = 100) -> dict[str, Any]:
        everyone = _everyone(request.state.user, all)
        limit = min(max(limit, 1), 1000)
        data = await asyncio.to_thread(store.conversations, None if everyone else request.state.user, limit)
        return {"object": "list", "data": data}

    @app.get("/v1/feedback/export", dependencies=auth)
    async def export(request: Request, format: str = "pairs", all: bool = False) -> Response:
        if format not in FORMATS:
            raise ApiError(400, f"format must be one of {', '.join(FORMATS)}", param="format", code="invalid_value")
        user = request.state.user
        filters = Filters(user=None if _everyone(user, all) else user.name)
        result = await asyncio.to_thread(export_rows, store.db, format, filters)
        return Response(jsonl(result.rows), media_type="application/x-ndjson")


def _everyone(user: UserInfo, asked: bool) -> bool:
    if asked and not user.is_admin:
        raise ApiError(403, "only an admin key may read everyone's conversations (all=true)",
                       "permission_error", code="forbidden")
    return asked


async def _feedback_body(request: Request) -> FeedbackBody:
    raw = await read_json_body(request)
    for name in ("comment", "edited"):
        value = raw.get(name)
        if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
            raise ApiError(413, f"{name} is {len(value)} characters; the limit is {MAX_TEXT_CHARS}", param=name,
                           code="request_too_large")
    try:
        return FeedbackBody.model_validate(raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None

