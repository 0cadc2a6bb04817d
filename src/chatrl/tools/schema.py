"""Tools an environment offers: a name, an OpenAI function-calling schema and the Python callable that runs it.

An environment declares `tools` as a list whose items are any of
- a plain Python callable with type hints and a Google-style docstring (the schema comes from
  `transformers.utils.get_json_schema`, the function transformers' chat templates are given tools with),
- a pair `(schema, callable)` with an OpenAI schema `{"type": "function", "function": {"name", "description",
  "parameters"}}` (or just its inner `function` object),
- a name of a built-in tool (`chatrl.tools.builtin.BUILTIN_TOOLS`: calculator, python) or a spec
  `pkg.module:fn` / `file.py:fn` loaded with `chatrl.plugins.load_object`,
- a `Tool` (already resolved).
`resolve_tools` turns such a list into `Tool`s once, so a mistake is one line naming the tool before any episode.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers.utils import get_json_schema

from chatrl.errors import ChatrlError
from chatrl.plugins import load_object

# example values `example_arguments` gives each JSON-schema type (`chatrl env check` plays every tool with them)
EXAMPLES: dict[str, Any] = {"string": "1 + 2", "integer": 2, "number": 1.5, "boolean": True, "array": [],
                            "object": {}, "null": None}
JSON_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                           "boolean": (bool,), "array": (list,), "object": (dict,)}


@dataclass(frozen=True)
class Tool:
    """One callable tool: `schema` is the OpenAI function-calling schema the chat template shows the model."""

    name: str
    schema: dict[str, Any]
    fn: Callable[..., Any]

    @property
    def parameters(self) -> dict[str, Any]:
        return self.schema["function"].get("parameters") or {"type": "object", "properties": {}}


def _builtin_tools() -> dict[str, Callable[..., Any]]:
    # imported when a name is looked up: the built-in tools module imports the sandbox, which only tool users need
    from chatrl.tools.builtin import BUILTIN_TOOLS

    return BUILTIN_TOOLS


def _from_callable(fn: Callable[..., Any], where: str) -> Tool:
    try:
        schema = get_json_schema(fn)
    except Exception as e:  # transformers raises TypeHintParsingException / DocstringParsingException
        name = getattr(fn, "__name__", repr(fn))
        raise ChatrlError(f"{where}: tool {name!r} has no usable schema ({e}); give it type hints and a "
                          "Google-style docstring with an Args: section, or pair it with an OpenAI schema") from None
    return Tool(schema["function"]["name"], schema, fn)


def _from_schema(schema: object, fn: object, where: str) -> Tool:
    if not isinstance(schema, dict):
        raise ChatrlError(f"{where}: a (schema, callable) tool needs a dict schema, got {type(schema).__name__}")
    inner = schema.get("function", schema) if schema.get("type", "function") == "function" else None
    if not isinstance(inner, dict) or not isinstance(inner.get("name"), str) or not inner["name"]:
        raise ChatrlError(f"{where}: schema {str(schema)[:80]} is not an OpenAI function schema "
                          "({'type': 'function', 'function': {'name': ..., 'parameters': {...}}})")
    params = inner.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise ChatrlError(f"{where}: tool {inner['name']!r}: parameters must be a JSON schema of type 'object'")
    if not callable(fn):
        raise ChatrlError(f"{where}: tool {inner['name']!r} is paired with {type(fn).__name__}, not a callable")
    return Tool(inner["name"], {"type": "function", "function": {**inner, "parameters": params}}, fn)


def resolve_tool(item: object, where: str) -> Tool:
    """One declared tool as a `Tool`; `where` names the setting for errors (e.g. "env.tools")."""
    if isinstance(item, Tool):
        return item
    if isinstance(item, str):
        builtin = _builtin_tools()
        if item in builtin:
            return _from_callable(builtin[item], where)
        if ":" not in item:
            raise ChatrlError(f"{where}: unknown tool {item!r}: built-ins are {', '.join(builtin)}; for your own "
                              "give 'pkg.module:fn' or 'file.py:fn'")
        return _from_callable(load_object(item, "tool", where), where)  # type: ignore[arg-type]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return _from_schema(item[0], item[1], where)
    if callable(item):
        return _from_callable(item, where)
    raise ChatrlError(f"{where}: {str(item)[:80]} ({type(item).__name__}) is not a tool: give a callable, a "
                      "(schema, callable) pair, a built-in name or 'pkg.module:fn'")


def resolve_tools(items: Sequence[object] | None, where: str) -> list[Tool]:
    """Declared tools as `Tool`s, names unique."""
    if items is None:
        return []
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise ChatrlError(f"{where} must be a list of tools, got {type(items).__name__}")
    tools = [resolve_tool(item, where) for item in items]
    names = [t.name for t in tools]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ChatrlError(f"{where}: tool name(s) {', '.join(dupes)} declared twice; names must be unique")
    return tools


def argument_problem(tool: Tool, arguments: object) -> str | None:
    """Why `arguments` cannot be passed to `tool` (a line for the model to read), or None when they fit the schema:
    an object, every required parameter present, no unknown one, JSON types as declared."""
    if not isinstance(arguments, dict):
        return f"arguments of {tool.name} must be a JSON object, got {type(arguments).__name__}"
    props = tool.parameters.get("properties", {}) or {}
    missing = [k for k in tool.parameters.get("required", []) if k not in arguments]
    if missing:
        return f"{tool.name} is missing required argument(s): {', '.join(missing)}"
    unknown = [k for k in arguments if k not in props]
    if unknown:
        return f"{tool.name} has no argument(s) {', '.join(unknown)}; it takes {', '.join(props) or 'none'}"
    for key, value in arguments.items():
        expected = props[key].get("type") if isinstance(props[key], dict) else None
        kinds = [expected] if isinstance(expected, str) else list(expected or [])
        types = tuple(t for k in kinds for t in JSON_TYPES.get(k, (object,)))
        if value is None and "null" in kinds:
            continue
        if types and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            return f"argument {key} of {tool.name} must be {' or '.join(kinds)}, got {type(value).__name__}"
    try:  # the callable itself must accept them too (a schema paired with a different function)
        inspect.signature(tool.fn).bind(**arguments)
    except TypeError as e:
        return f"{tool.name}: {e}"
    except ValueError:  # no signature (some builtins): the call itself will tell
        pass
    return None


def example_arguments(tool: Tool) -> dict[str, Any]:
    """Arguments built from the schema: each required parameter's first enum value, default, or an example of its
    type (a string is the expression "1 + 2")."""
    props = tool.parameters.get("properties", {}) or {}
    out: dict[str, Any] = {}
    for key in tool.parameters.get("required", []):
        spec = props.get(key, {}) if isinstance(props.get(key), dict) else {}
        if spec.get("enum"):
            out[key] = spec["enum"][0]
        elif "default" in spec:
            out[key] = spec["default"]
        else:
            kind = spec.get("type", "string")
            out[key] = EXAMPLES.get(kind if isinstance(kind, str) else kind[0], "1 + 2")
    return out
