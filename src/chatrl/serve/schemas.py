"""The OpenAI chat-completions wire format: request validation and response/chunk/error bodies.

Requests are validated strictly (a string where a number belongs is an error, not coerced) and
unknown fields are ignored, like OpenAI's API does for fields a server does not implement.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

MAX_N = 8
MAX_STOP = 4


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """One message; "developer" is OpenAI's newer name for "system"."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


Number = StrictFloat | StrictInt


class ChatRequest(BaseModel):
    """The fields of `POST /v1/chat/completions` this server honours."""

    model_config = ConfigDict(extra="ignore")
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None = None
    seed: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v: int | None) -> int | None:
        if v is not None and not (-(2**63) <= v < 2**63):
            raise ValueError("seed must fit in a signed 64-bit integer")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def template_messages(self) -> list[dict[str, str]]:
        return [m.as_template_message() for m in self.messages]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def validation_error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Turn pydantic/FastAPI validation errors into one readable OpenAI-style error."""
    parts, first_param = [], None
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # pydantic adds the union member tried ("str", "list[...]", "function-after[...]"): not useful to users
        loc = [x for x in loc if not (x[:1].isalpha() and ("[" in x or x in ("str", "int", "float", "bool")))]
        param = ".".join(loc) or None
        first_param = first_param or param
        parts.append(f"{param or 'body'}: {err.get('msg', 'invalid')}")
    return error_body("invalid request: " + "; ".join(parts), param=first_param, code="invalid_value")


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, texts: list[str], finish: list[str | None], prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    """A non-streaming `chat.completion` with one choice per text."""
    choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                "finish_reason": f or "stop"} for i, (t, f) in enumerate(zip(texts, finish, strict=True))]
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def chunk_body(cid: str, model: str, created: int, choices: list[dict[str, Any]],
               usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk` (an SSE `data:` payload)."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, "usage": usage_, "system_fingerprint": None}


def chunk_choice(index: int, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
