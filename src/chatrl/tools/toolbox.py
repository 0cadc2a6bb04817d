"""`ToolBox`: what an episode runner needs to let the model call tools: the environment's tools (declared on the
environment as `env.tools`, plus the config's `env.tools`), the call parser and the limits (`env.max_tool_calls`,
`env.tool_timeout`, `env.tool_error_penalty`). Built once per rollout from the environment and the settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from chatrl.errors import ChatrlError
from chatrl.tools.parsers import Parser, ToolCall, load_parser
from chatrl.tools.runner import ToolResult, run_calls
from chatrl.tools.schema import Tool, resolve_tools


class ToolSettings(Protocol):
    """The tool options of the `env` config section (`config_rl.EnvConfig` has them; so has `ToolOptions`)."""

    tools: list[str]
    tool_parser: str
    max_tool_calls: int
    tool_timeout: float
    tool_error_penalty: float


@dataclass
class ToolOptions:
    """The defaults of the env section's tool options, for runners without a config (eval, scripts)."""

    tools: list[str] = field(default_factory=list)
    tool_parser: str = "auto"
    max_tool_calls: int = 4
    tool_timeout: float = 10.0
    tool_error_penalty: float = 0.0


def check_tool_settings(s: ToolSettings) -> None:
    """The options' ranges, as one line naming the field."""
    if isinstance(s.max_tool_calls, bool) or s.max_tool_calls < 0:
        raise ChatrlError(f"env.max_tool_calls={s.max_tool_calls} must be >= 0 (0 = the model may not call tools)")
    if not (s.tool_timeout > 0 and math.isfinite(s.tool_timeout)):
        raise ChatrlError(f"env.tool_timeout={s.tool_timeout} must be a positive number of seconds")
    if not (s.tool_error_penalty >= 0 and math.isfinite(s.tool_error_penalty)):
        raise ChatrlError(f"env.tool_error_penalty={s.tool_error_penalty} must be >= 0 (it is subtracted)")
    load_parser(s.tool_parser)


@dataclass
class ToolBox:
    """Resolved tools plus how to find and answer their calls."""

    tools: dict[str, Tool]
    parse: Parser
    parser_name: str
    max_calls: int
    timeout: float
    error_penalty: float

    @property
    def schemas(self) -> list[dict[str, Any]]:
        """OpenAI function schemas, for the chat template (`render(..., tools=...)`)."""
        return [t.schema for t in self.tools.values()]

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    def calls_in(self, text: str) -> list[ToolCall]:
        return self.parse(text)

    def run(self, calls: list[ToolCall]) -> list[ToolResult]:
        return run_calls(calls, self.tools, self.timeout)


def declared_tools(env: object, env_name: str) -> list[Tool]:
    """The tools an environment instance declares (its `tools` attribute), resolved."""
    return resolve_tools(getattr(env, "tools", None) or [], f"environment '{env_name}' tools")


def toolbox_for(env: object, env_name: str, settings: ToolSettings | None = None) -> ToolBox | None:
    """The ToolBox of episodes in `env` (None when there are no tools at all: episodes play as without tools)."""
    s = settings or ToolOptions()
    tools = declared_tools(env, env_name) + resolve_tools(s.tools, "env.tools")
    if not tools:
        return None
    names = [t.name for t in tools]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ChatrlError(f"env.tools: tool(s) {', '.join(dupes)} are already declared by environment "
                          f"'{env_name}'; list each tool once")
    check_tool_settings(s)
    return ToolBox({t.name: t for t in tools}, load_parser(s.tool_parser), s.tool_parser, s.max_tool_calls,
                   float(s.tool_timeout), float(s.tool_error_penalty))
