"""`chatrl serve`: an OpenAI-compatible chat server (FastAPI) plus a small web chat page at `/`.

Endpoints: `POST /v1/chat/completions` (plain or `stream: true` as SSE), `GET /v1/models`,
`GET /health`, `GET /` (the page). Every error, including bad input, is a JSON body in OpenAI's
error shape with a 4xx status. An explicit `max_tokens` (or `max_completion_tokens`) that does not fit
in the context window with the prompt is a 400 `context_length_exceeded`, as with OpenAI; the server's default
is clamped to the room left instead. All generation runs on one `GenerationWorker` thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatrl.errors import ChatrlError
from chatrl.serve import schemas
from chatrl.serve.generation import ChatModel, SamplingSettings
from chatrl.serve.ratelimit import RateLimited, RateLimiter
from chatrl.serve.reload import ModelSlot, Served, Watcher, install_reload
from chatrl.serve.run import run_server, start_in_thread  # noqa: F401 - callers import them from here
from chatrl.serve.worker import Event, Job, QueueFull

STATIC = Path(__file__).parent / "static"
# What the pages (index.html, arena.html) load, by path under static/: their shared style and script, the chat page's
# vendored Markdown renderer and sanitizer. A fixed table: no path from the URL ever reaches the file system.
ASSETS = {"common.css": "text/css", "common.js": "text/javascript", "vendor/marked.min.js": "text/javascript",
          "vendor/purify.min.js": "text/javascript"}
MAX_BODY_BYTES = 16 * 2**20
CHARS_PER_TOKEN_LIMIT = 32  # a prompt longer than window * this many characters is refused before tokenizing


class ApiError(Exception):
    """An error answered as `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, schemas.error_body(message, type_, param, code)


def create_app(model_path: str, api_key: str | None = None, *, dtype: str = "auto",
               context_window: int | None = None, max_active: int = 8, max_queue: int = 256,
               default_max_tokens: int = 256, model_name: str | None = None,
               chat: ChatModel | None = None, db: str | None = None, rate_limit: int = 0,
               load: Callable[[str], ChatModel] | None = None, watch: str | None = None,
               watch_interval: float = 10.0, arena: dict[str, ChatModel] | None = None) -> FastAPI:
    """Load the model (or reuse `chat`), start its worker thread, and return the app.

    `api_key`: when set, every endpoint except `/health` and the static page at `/` needs
    `Authorization: Bearer <api_key>`. `db` (file or SQLAlchemy URL): store every completion, take feedback, require
    its users' keys (`chatrl.feedback.api`). `rate_limit`: requests per minute per key (0 = no limit).
    `load(path)`: how `POST /admin/reload` and `watch` (a run folder polled every `watch_interval` s) load a model.
    `arena` (needs `db`): more models by name; `POST /v1/arena` and the page at `/` then show two anonymous replies
    side by side (`chatrl.feedback.arena`).
    """
    if arena and db is None:
        raise ChatrlError("--arena needs --db FILE: the choices between the two replies are stored there")
    load = load or (lambda path: ChatModel(path, dtype=dtype, context_window=context_window))
    slot = ModelSlot(Served(chat or load(model_path), max_active, max_queue),
                     lambda path: Served(load(path), max_active, max_queue))
    name = model_name or Path(str(model_path).rstrip("/")).name
    feedback = _feedback_api() if db is not None else None
    recorder = feedback.open_recorder(db, name) if feedback else None
    watcher = Watcher(slot, watch, watch_interval) if watch else None
    others = {n: ModelSlot(Served(c, max_active, max_queue), lambda path: Served(load(path), max_active, max_queue))
              for n, c in (arena or {}).items()}

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if watcher:
            watcher.start()
        yield
        if watcher:
            watcher.stop()
        slot.stop()
        for other in others.values():
            other.stop()
        if recorder is not None:
            recorder.close()

    app = FastAPI(title="chatrl", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.slot, app.state.model_name, app.state.recorder = slot, name, recorder
    _add_error_handlers(app)
    gate = feedback.UserGate(recorder.store, api_key) if feedback else _auth_dependency(api_key)
    auth = [Depends(gate), Depends(_rate_dependency(RateLimiter(rate_limit)))]
    if feedback:
        feedback.install(app, recorder, auth)
    if others:
        from chatrl.feedback.arena import Arena, install_arena  # lazy: the feedback extra, as _feedback_api

        install_arena(app, Arena({name: slot, **others}), recorder, auth, default_max_tokens)
    install_reload(app, slot, auth, ApiError)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        active, queued = slot.current.worker.load
        return {"status": "ok", "model": name, "model_version": slot.current.version, "active": active,
                "queued": queued, "arena": bool(others)}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / ("arena.html" if others else "index.html"), media_type="text/html")

    @app.get("/static/{asset:path}", include_in_schema=False)
    async def static(asset: str) -> FileResponse:
        if asset not in ASSETS:
            raise ApiError(404, f"no static file {asset!r}", code="not_found")
        return FileResponse(STATIC / asset, media_type=ASSETS[asset])

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(name)]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise ApiError(404, f"model {model_id!r} not found; this server serves {name!r}", code="model_not_found")
        return _model_card(name)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request):
        req = await _parse_request(request)
        served = slot.lease()  # this request runs on the model current now, even if a reload comes meanwhile
        try:
            return await _chat_completion(request, req, served, slot, name, recorder, default_max_tokens)
        except BaseException:
            slot.release(served)
            raise

    return app


async def _chat_completion(request: Request, req: schemas.ChatRequest, served: Served, slot: ModelSlot, name: str,
                           recorder, default_max_tokens: int):
    """Run one request on `served`; its lease is returned when the answer (or the stream) is done."""
    prompt_ids, settings = _prepare(served.chat, req, default_max_tokens)
    on_done = await recorder.on_done(request.state.user, req, settings, served.version) if recorder else None
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    job = Job(prompt_ids, settings, sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), n=req.n or 1)
    try:
        served.worker.submit(job)
    except QueueFull as e:
        raise ApiError(503, f"server busy: {e}; retry later", "server_error", code="server_overloaded") from e
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream:
        body = _sse(job, events, name, len(prompt_ids), include_usage, on_done)
        # a client gone before the first chunk means the generator never starts (its `finally` never runs):
        # cancel the job when the generator is dropped too; the lease goes back with it
        weakref.finalize(body, job.cancel)
        weakref.finalize(body, slot.release, served)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    answer = await _complete(job, events, request, name, len(prompt_ids), on_done)
    slot.release(served)
    return answer


# What a finished completion is handed to: stores it, returns the fields added to its response
OnDone = Callable[[str, list[str], list[str | None]], Awaitable[dict[str, Any]]]


def _feedback_api():
    """`chatrl.feedback.api`, imported only for `--db`: SQLAlchemy and Alembic are the optional `feedback` extra."""
    try:
        from chatrl.feedback import api
    except ModuleNotFoundError as e:
        raise ChatrlError(f"--db needs the feedback extra ({e.name} is missing): pip install 'chatrl[feedback]'") from None
    return api


def _rate_dependency(limiter: RateLimiter):
    """Count the request against its key (or, without one, its address); 429 past the limit."""

    async def check(request: Request) -> None:
        who = request.headers.get("authorization") or (request.client.host if request.client else "unknown")
        try:
            limiter.check(who)
        except RateLimited as e:
            raise ApiError(429, f"rate limit reached: {limiter.per_minute} requests per minute per key; retry in "
                                f"{e.retry_after:.0f} s", "requests", code="rate_limit_exceeded") from None

    return check


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "chatrl"}


def _auth_dependency(api_key: str | None):
    """A FastAPI dependency that checks `Authorization: Bearer KEY` in constant time (no-op without a key)."""
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").strip().encode()
        if not hmac.compare_digest(given, expected):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (the key given to "
                                "chatrl serve --api-key)", code="invalid_api_key")

    return check


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI-shaped JSON: validation -> 400, HTTP errors keep their status."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(schemas.validation_error_body(list(exc.errors())), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(schemas.error_body(str(exc.detail), code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crash(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(schemas.error_body(f"internal error: {exc}", "server_error"), status_code=500)


async def read_json_body(request: Request) -> dict[str, Any]:
    """The JSON object in the body, whatever the Content-Type (curl -d sends a form type); 400/413 otherwise."""
    raw = await _read_body(request)
    try:
        return schemas.decode_body(raw)
    except schemas.BodyError as e:
        raise ApiError(400, str(e), code=e.code) from None


async def _parse_request(request: Request) -> schemas.ChatRequest:
    body = await read_json_body(request)
    try:
        return schemas.ChatRequest.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from e


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 past `MAX_BODY_BYTES`: checked on the header and again while reading, since a
    chunked upload has no Content-Length."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise _too_large(int(length))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large(size)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int) -> ApiError:
    return ApiError(413, f"the request body is {size} bytes or more; the limit is {MAX_BODY_BYTES}",
                    code="request_too_large")


def _prepare(chat: ChatModel, req: schemas.ChatRequest, default_max_tokens: int) -> tuple[list[int], SamplingSettings]:
    """Render and size-check the prompt; turn request fields into sampling settings."""
    prompt_ids = _render_checked(chat, req)
    window = chat.context_window
    requested = req.max_completion_tokens or req.max_tokens
    if requested is not None and len(prompt_ids) + requested > window:
        # OpenAI's answer (and wording) for an explicit limit that cannot fit; a server default is clamped instead
        raise ApiError(400, f"This model's maximum context length is {window} tokens. However, you requested "
                            f"{len(prompt_ids) + requested} tokens ({len(prompt_ids)} in the messages, {requested} "
                            f"in the completion). Please reduce the length of the messages or completion.",
                       param="messages", code="context_length_exceeded")
    settings = SamplingSettings(
        max_new_tokens=min(requested or default_max_tokens, window - len(prompt_ids)),
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        stop=req.stop_list(), seed=req.seed)
    return prompt_ids, settings


def _render_checked(chat: ChatModel, req: schemas.ChatRequest) -> list[int]:
    """The prompt's token ids, refusing what cannot fit: by a cheap size estimate first, so a huge body never
    reaches the chat template (which runs on the event loop), then by the exact token count."""
    messages = req.template_messages()
    chars = sum(len(m["content"]) for m in messages)
    window = chat.context_window
    if chars > window * CHARS_PER_TOKEN_LIMIT or len(messages) > window:
        raise ApiError(400, f"the request has {len(messages)} messages of {chars} characters, far over this model's "
                            f"context window of {window} tokens", param="messages", code="context_length_exceeded")
    try:
        prompt_ids = chat.render(messages)
    except Exception as e:  # a template may reject a role order (e.g. two system messages)
        raise ApiError(400, f"the chat template rejected these messages: {e}", param="messages") from e
    if len(prompt_ids) >= window:
        raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens; this model's context window is {window} "
                            f"tokens (prompt plus answer): shorten the messages", param="messages",
                       code="context_length_exceeded")
    return prompt_ids


async def _complete(job: Job, events: asyncio.Queue[Event], request: Request, model: str,
                    prompt_tokens: int, on_done: OnDone | None = None) -> JSONResponse:
    """Wait for all choices; if the client hangs up first, cancel the job (frees its worker slot)."""
    texts, finish, tokens = [""] * job.n, [None] * job.n, [0] * job.n
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done = 0
        while done < job.n:
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                return JSONResponse(schemas.error_body("client disconnected"), status_code=499)
            ev = getter.result()
            if ev.error:
                raise ApiError(500, ev.error, "server_error")
            texts[ev.index] += ev.text
            if ev.finish_reason:
                finish[ev.index], tokens[ev.index] = ev.finish_reason, ev.completion_tokens
                done += 1
    finally:
        gone.cancel()
        job.cancel()
    cid = schemas.new_id()
    body = schemas.completion_body(cid, model, texts, finish, prompt_tokens, sum(tokens))
    if on_done is not None:
        body.update(await on_done(cid, texts, finish))  # stored before it is answered: feedback on it can follow
    return JSONResponse(body)


async def _wait_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body is already read, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse_data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _sse(job: Job, events: asyncio.Queue[Event], model: str, prompt_tokens: int,
               include_usage: bool, on_done: OnDone | None = None) -> AsyncIterator[str]:
    """OpenAI-style SSE: a role chunk per choice, content chunks, a finish chunk per choice, usage, [DONE].

    Usage goes in its own final chunk with no choices when `stream_options.include_usage` asks for it
    (OpenAI's format), else on the last finish chunk. Closing this generator (client gone) cancels the job.
    With `on_done`, the completion is stored before the last finish chunk, which carries the ids it returns.
    """
    cid, created = schemas.new_id(), int(time.time())
    texts, finish = [""] * job.n, [None] * job.n

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None, extra: dict | None = None) -> str:
        return _sse_data({**schemas.chunk_body(cid, model, created, choices, usage), **(extra or {})})

    try:
        for i in range(job.n):
            yield chunk([schemas.chunk_choice(i, {"role": "assistant", "content": ""})])
        done, tokens = 0, 0
        while done < job.n:
            ev = await events.get()
            if ev.error:
                yield _sse_data(schemas.error_body(ev.error, "server_error"))
                return
            if ev.text:
                texts[ev.index] += ev.text
                yield chunk([schemas.chunk_choice(ev.index, {"content": ev.text})])
            if ev.finish_reason:
                done, tokens, finish[ev.index] = done + 1, tokens + ev.completion_tokens, ev.finish_reason
                last = done == job.n and not include_usage
                try:
                    stored = await on_done(cid, texts, finish) if on_done is not None and done == job.n else None
                except Exception as e:  # not stored (database down): say so in the stream instead of cutting it
                    yield _sse_data(schemas.error_body(f"the reply could not be stored: {e}", "server_error"))
                    return
                yield chunk([schemas.chunk_choice(ev.index, {}, ev.finish_reason)],
                            schemas.usage(prompt_tokens, tokens) if last else None, stored)
        if include_usage:
            yield chunk([], schemas.usage(prompt_tokens, tokens))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()
