"""Tool calls in a reply, in the formats chat models are trained to write them:

- hermes (Hermes, Qwen 2/2.5/3, the fallback format): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  one block per call (an unclosed last block runs to the end of the reply: the model may stop at EOS);
- llama3 (Llama 3.1+ JSON tool calling): the reply is `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`; several calls separated by `;`);
- mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`, or the v11+ form `[TOOL_CALLS]name[ARGS]{...}`;
- auto (the default): whichever of these the reply uses;
- a user parser `pkg.module:fn` (env.tool_parser): fn(text) -> a list of `ToolCall`s or of dicts
  {"name": ..., "arguments": {...}}.

A call that is recognised as one but cannot be used (bad JSON, no name, arguments not an object) comes back as a
`ToolCall` with `error` set: the runner answers it with that error text instead of running anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chatrl.errors import ChatrlError
from chatrl.plugins import load_object

HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
PYTHON_TAG = "<|python_tag|>"
MISTRAL = "[TOOL_CALLS]"
MISTRAL_ARGS = re.compile(r"\s*([\w.\-]+)(?:\[CALL_ID\][\w\-]*)?\[ARGS\]")


@dataclass(frozen=True)
class ToolCall:
    """One call the model wrote: `name` and `arguments`, or `error` saying why it is malformed."""

    name: str | None
    arguments: dict[str, Any] | None
    error: str | None = None


Parser = Callable[[str], list[ToolCall]]


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."


def call_from_object(obj: object, raw: str, argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall:
    """A decoded call object {"name": ..., "arguments": {...}} as a ToolCall (arguments may be a JSON string, as in
    OpenAI's wire format)."""
    if not isinstance(obj, dict):
        return ToolCall(None, None, f"a tool call must be a JSON object, got {_short(raw)}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCall(None, None, f"a tool call needs a \"name\", got {_short(raw)}")
    args = next((obj[k] for k in argument_keys if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return ToolCall(name, None, f"the arguments of {name} are not valid JSON ({e.msg})")
    if not isinstance(args, dict):
        return ToolCall(name, None, f"the arguments of {name} must be a JSON object, got {type(args).__name__}")
    return ToolCall(name, args)


def _decode(body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall(None, None, f"the tool call is not valid JSON ({e.msg} at column {e.colno}): {_short(body)}")
    return call_from_object(obj, body)


def parse_hermes(text: str) -> list[ToolCall]:
    return [_decode(m.group(1).strip()) for m in HERMES.finditer(text)]


def _json_objects(text: str) -> list[tuple[object, str] | str]:
    """Consecutive JSON values in `text` separated by whitespace or ';'; a tail that is not JSON is returned as a
    string (the malformed rest)."""
    decoder, out, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] == ";"):
            pos += 1
        if pos >= len(text):
            return out
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            out.append(text[pos:])
            return out
        out.append((obj, text[pos:end]))
        pos = end


def parse_llama3(text: str) -> list[ToolCall]:
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    if not body.startswith("{"):
        return []
    calls = []
    for item in _json_objects(body):
        if isinstance(item, str):
            calls.append(_decode(item.strip()))
        else:
            calls.append(call_from_object(item[0], item[1], ("parameters", "arguments")))
    return calls


def parse_mistral(text: str) -> list[ToolCall]:
    if MISTRAL not in text:
        return []
    body = text.split(MISTRAL, 1)[1]
    if body.strip().startswith("["):  # [TOOL_CALLS] [{...}, ...]
        try:
            items = json.loads(body.strip())
        except json.JSONDecodeError as e:
            return [ToolCall(None, None, f"the tool calls are not a valid JSON list ({e.msg}): {_short(body)}")]
        if not isinstance(items, list):
            return [ToolCall(None, None, f"[TOOL_CALLS] must be followed by a JSON list, got {_short(body)}")]
        return [call_from_object(item, json.dumps(item)) for item in items]
    calls = []  # [TOOL_CALLS]name[ARGS]{...}[TOOL_CALLS]name2[ARGS]{...}
    for part in text.split(MISTRAL)[1:]:
        m = MISTRAL_ARGS.match(part)
        if not m:
            calls.append(ToolCall(None, None, f"expected [TOOL_CALLS]name[ARGS]{{...}}, got {_short(part)}"))
            continue
        args = part[m.end():].strip()
        try:
            calls.append(call_from_object({"name": m.group(1), "arguments": json.loads(args)}, args))
        except json.JSONDecodeError as e:
            calls.append(ToolCall(m.group(1), None, f"the arguments of {m.group(1)} are not valid JSON ({e.msg})"))
    return calls


def parse_auto(text: str) -> list[ToolCall]:
    """Whichever format the reply uses (checked in this order: hermes, mistral, llama3)."""
    if "<tool_call>" in text:
        return parse_hermes(text)
    if MISTRAL in text:
        return parse_mistral(text)
    body = text.strip()
    if body.startswith(PYTHON_TAG) or (body.startswith("{") and '"name"' in body):
        return parse_llama3(text)
    return []


PARSERS: dict[str, Parser] = {"auto": parse_auto, "hermes": parse_hermes, "llama3": parse_llama3,
                              "mistral": parse_mistral}


def format_call(parser: str, name: str, arguments: dict[str, Any]) -> str:
    """A reply calling `name` in the format `parser` reads (hermes for auto and user parsers): the model's side of
    the template audit's sample conversation."""
    if parser == "llama3":
        return json.dumps({"name": name, "parameters": arguments})
    if parser == "mistral":
        return f"{MISTRAL} " + json.dumps([{"name": name, "arguments": arguments}])
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def _normalise(spec: str, result: object) -> list[ToolCall]:
    if not isinstance(result, (list, tuple)):
        return [ToolCall(None, None, f"tool parser {spec} returned {type(result).__name__}, not a list of calls")]
    calls = []
    for item in result:
        if isinstance(item, ToolCall):
            calls.append(item)
        else:
            calls.append(call_from_object(item, str(item)))
    return calls


def load_parser(spec: str) -> Parser:
    """The parser env.tool_parser names: a built-in format, or 'pkg.module:fn' (whose exceptions and odd results
    become malformed calls, so a parser bug cannot stop a run)."""
    if spec in PARSERS:
        return PARSERS[spec]
    if ":" not in spec:
        raise ChatrlError(f"env.tool_parser={spec!r}: expected one of {', '.join(PARSERS)} or 'pkg.module:fn'")
    fn = load_object(spec, "tool parser", "env.tool_parser")

    def parse(text: str) -> list[ToolCall]:
        try:
            return _normalise(spec, fn(text))  # type: ignore[operator]
        except Exception as e:
            return [ToolCall(None, None, f"tool parser {spec} raised {type(e).__name__}: {_short(str(e))}")]

    return parse
