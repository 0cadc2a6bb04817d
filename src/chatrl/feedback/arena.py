"""The arena of `chatrl serve --model a=PATH --model b=PATH --arena --db FILE`: two anonymous replies, one choice.

`POST /v1/arena` takes a chat request (messages, max_tokens, temperature, seed, conversation_id) and answers with
the replies of two of the served models (a random pair when there are more), in a random order and without their
names: `{"prompt_id", "conversation_id", "completions": [{"completion_id", "content", "finish_reason"}, x2]}`. Both
replies are stored as children of the same prompt, each with the name and version of the model that wrote it, so
the choice is an ordinary pair event, `POST /v1/feedback {prompt_id, chosen_id, rejected_id}`, whose answer names
the two models (`models`). `chatrl feedback leaderboard` ranks the models from those pair events; `chatrl feedback
export --format pairs` trains on them like any other choice.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from fastapi import FastAPI, Request

from chatrl.feedback.api import Recorder
from chatrl.feedback.store import Reply
from chatrl.serve import schemas
from chatrl.serve.reload import ModelSlot, Served
from chatrl.serve.server import ApiError, _parse_request, _prepare
from chatrl.serve.worker import Event, Job, QueueFull


class Arena:
    """The served models by name and the random pairing; `stop()` ends the workers of all but the main slot."""

    def __init__(self, slots: dict[str, ModelSlot], rng: random.Random | None = None):
        if len(slots) < 2:
            raise ValueError("an arena needs at least two models")
        self.slots = slots
        self.rng = rng or random.SystemRandom()  # unpredictable order: a user cannot learn which side is which

    def pick(self) -> list[str]:
        """Two distinct model names in random order."""
        return self.rng.sample(sorted(self.slots), 2)


async def generate(served: Served, req: schemas.ChatRequest, default_max_tokens: int) -> tuple[str, str | None]:
    """One reply of `served` to `req`: (text, finish reason)."""
    prompt_ids, settings = _prepare(served.chat, req, default_max_tokens)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    job = Job(prompt_ids, settings, sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), n=1)
    try:
        served.worker.submit(job)
    except QueueFull as e:
        raise ApiError(503, f"server busy: {e}; retry later", "server_error", code="server_overloaded") from e
    text = ""
    try:
        while True:
            ev = await events.get()
            if ev.error:
                raise ApiError(500, ev.error, "server_error")
            text += ev.text
            if ev.finish_reason:
                return text, ev.finish_reason
    finally:
        job.cancel()


def install_arena(app: FastAPI, arena: Arena, recorder: Recorder, auth: list[Any], default_max_tokens: int) -> None:
    """Add `POST /v1/arena` to `app`."""

    @app.post("/v1/arena", dependencies=auth)
    async def arena_pair(request: Request) -> dict[str, Any]:
        req = await _parse_request(request)
        if req.stream or (req.n or 1) != 1:
            raise ApiError(400, "an arena request gives one reply per model: no stream, n=1", param="stream",
                           code="invalid_value")
        user = request.state.user
        if req.conversation_id is not None:
            await asyncio.to_thread(recorder.store.check_conversation, user, req.conversation_id)
        names = arena.pick()
        leased = [arena.slots[name].lease() for name in names]
        try:
            results = await asyncio.gather(*(generate(s, req, default_max_tokens) for s in leased))
        finally:
            for name, served in zip(names, leased, strict=True):
                arena.slots[name].release(served)
        replies = [Reply(schemas.new_id(), text, finish, model_name=name, version=served.version)
                   for name, served, (text, finish) in zip(names, leased, results, strict=True)]
        sampling = {"temperature": 1.0 if req.temperature is None else req.temperature,
                    "top_p": 1.0 if req.top_p is None else req.top_p, "seed": req.seed, "arena": True}
        done = await recorder.write(recorder.store.record_completion, user, req.template_messages(), replies,
                                    model_name="arena", version="arena", sampling=sampling,
                                    conversation=req.conversation_id)
        return {"object": "arena", "conversation_id": done.conversation_id, "prompt_id": done.prompt_id,
                "completions": [{"completion_id": r.completion_id, "content": r.text, "finish_reason": r.finish_reason}
                                for r in replies]}
