"""The OpenAI chat-completions wire format: request decoding and validation, response/chunk/error bodies.

Requests are validated strictly (a string where a number belongs is an error, not coerced) and
unknown fields are ignored, like OpenAI's API does for fields a server does not implement. Bodies
are decoded defensively (`decode_body`): a client controls every byte, so nesting depth, NaN and
lone surrogates are refused here, before anything recursive or any encoder sees them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

MAX_N = 8
MAX_STOP = 4
MAX_STOP_CHARS = 1024  # the stop matcher's hold-back check costs O(len(stop)) string compares per token
MAX_DEPTH = 64  # JSON nesting levels; real requests (even JSON-schema tools) stay far below


class BodyError(ValueError):
    """A request body that cannot be a chat request at all (answered 400 with `code`)."""

    def __init__(self, message: str, code: str = "invalid_json"):
        super().__init__(message)
        self.code = code


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (numbers must be finite)")


def decode_body(raw: bytes) -> dict[str, Any]:
    """The JSON object in `raw`, or `BodyError`: empty, not JSON, NaN/Infinity, too deep, not an object,
    or a string that is not valid Unicode."""
    if not raw.strip():
        raise BodyError('the request body is empty: send a JSON object with at least "messages"')
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        # `from None`: the chained traceback of a thousand-frame recursion is useless and large
        raise BodyError(f"the request body is nested too deeply (the limit is {MAX_DEPTH} levels)") from None
    except ValueError as e:  # bad syntax, bad encoding, NaN/Infinity, integers over Python's 4300-digit limit
        raise BodyError(f"the request body is not valid JSON: {str(e)[:300]}") from None
    if not isinstance(body, dict):
        raise BodyError(f"the request body must be a JSON object, not {type(body).__name__}")
    _check_tree(body)
    return body


def _check_tree(body: dict[str, Any]) -> None:
    """Depth and text checks without recursion (an explicit stack), so no input can exhaust the call stack."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_text(node)
            continue
        if not isinstance(node, dict | list):
            continue
        if depth > MAX_DEPTH:
            raise BodyError(f"the request body is nested too deeply (the limit is {MAX_DEPTH} levels)")
        if isinstance(node, dict):
            stack.extend((k, depth) for k in node)
        stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))


def _check_text(text: str) -> None:
    """A JSON `\\ud800` escape without its pair decodes to a lone surrogate: no tokenizer or encoder takes it."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BodyError("the request body has a string with an unpaired UTF-16 surrogate escape (\\ud800-\\udfff): "
                        "not valid Unicode", code="invalid_value") from None


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
StopText = Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)]


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
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None
    seed: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    # chatrl's own: the stored conversation (`conv-N`) this request continues (`chatrl serve --db`); without it a
    # request that repeats a stored reply continues that reply's conversation, any other starts a new one
    conversation_id: Annotated[StrictStr, Field(max_length=100)] | None = None

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
        # pydantic adds the union member tried ("str", "list[...]", "function-after[...]", "constrained-str"):
        # not useful to users
        loc = [x for x in loc if not _is_union_tag(x)]
        param = ".".join(loc) or None
        first_param = first_param or param
        parts.append(f"{param or 'body'}: {err.get('msg', 'invalid')}")
    return error_body("invalid request: " + "; ".join(parts), param=first_param, code="invalid_value")


def _is_union_tag(loc: str) -> bool:
    return loc[:1].isalpha() and ("[" in loc or loc.startswith("constrained-") or loc in ("str", "int", "float", "bool"))


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
