"""Run the tool calls of one decoding round concurrently, each under a timeout, never raising.

Every call gets a result text for the model: the tool's return value as text, or an "Error: ..." line when the call
is malformed (bad JSON, unknown tool, arguments that do not fit the schema), the tool raised, returned something
that cannot be shown as text, or ran past `timeout` seconds. Each result says which of these it was (`status`), so
the rollout can count them (tool/calls, tool/errors, tool/timeouts, tool/malformed) and penalise them.

Why daemon threads and not a ThreadPoolExecutor: a Python thread cannot be killed, and an executor's workers are
joined when the interpreter exits, so one tool that never returns would keep the training process from ever
exiting. A call past its timeout is abandoned instead (its daemon thread dies with the process), the model reads a
timeout error, and the run goes on. Tools that may hang for good should bound themselves (the built-in `python` tool
runs code in a subprocess with its own time limit).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chatrl.tools.parsers import ToolCall
from chatrl.tools.schema import Tool, argument_problem

MAX_RESULT_CHARS = 4000  # a tool result longer than this is cut: it is context the model must read every turn
STATUSES = ("ok", "error", "timeout", "malformed")


@dataclass(frozen=True)
class ToolResult:
    """What the model reads back (`content`), which tool (`name`; "?" for a call without one), how it went
    (`status`: ok, error = raised or unprintable, timeout, malformed) and its wall-clock latency in seconds."""

    name: str
    content: str
    status: str
    latency: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status != "ok"


def as_text(value: Any) -> str:
    """A tool's return value as the text the model reads: str as is, JSON-able values as JSON, else str(value).
    Raises when there is no such text (str() raised, or the text is not encodable, e.g. lone surrogates)."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = str(value)
    text.encode("utf-8")  # lone surrogates cannot be tokenized
    return text if len(text) <= MAX_RESULT_CHARS else text[:MAX_RESULT_CHARS] + " ...[truncated]"


class _Call(threading.Thread):
    """One tool call on its own daemon thread; `outcome` is set when it returns or raises."""

    def __init__(self, tool: Tool, arguments: dict[str, Any]) -> None:
        super().__init__(name=f"chatrl-tool-{tool.name}", daemon=True)
        self.tool, self.arguments = tool, arguments
        self.outcome: tuple[str, str] | None = None  # (status, content)
        self.started_at = 0.0
        self.latency = 0.0

    def run(self) -> None:
        try:
            value = self.tool.fn(**self.arguments)
        except Exception as e:
            outcome = ("error", f"Error: {self.tool.name} raised {type(e).__name__}: {_line(str(e))}")
        else:
            try:
                outcome = ("ok", as_text(value))
            except Exception as e:
                outcome = ("error", f"Error: {self.tool.name} returned a value that cannot be shown as text "
                                    f"({type(value).__name__}: {type(e).__name__})")
        self.latency = time.perf_counter() - self.started_at
        self.outcome = outcome  # last: the waiting side reads latency once it sees an outcome


def _line(text: str, n: int = 300) -> str:
    text = " / ".join(line.strip() for line in text.splitlines() if line.strip())
    return text if len(text) <= n else text[:n - 3] + "..."


def _malformed(call: ToolCall, tools: Mapping[str, Tool]) -> ToolResult | None:
    """The error result of a call that cannot be run, or None when it can."""
    name = call.name or "?"
    if call.error:
        return ToolResult(name, f"Error: {call.error}", "malformed")
    if call.name not in tools:
        return ToolResult(name, f"Error: unknown tool {call.name!r}; the tools are {', '.join(tools) or 'none'}",
                          "malformed")
    problem = argument_problem(tools[call.name], call.arguments)
    return ToolResult(name, f"Error: {problem}", "malformed") if problem else None


def run_calls(calls: Sequence[ToolCall], tools: Mapping[str, Tool], timeout: float) -> list[ToolResult]:
    """Results of `calls` in order. All runnable calls start at once, each may take `timeout` seconds."""
    return run_each([(call, tools) for call in calls], timeout)


def run_each(calls: Sequence[tuple[ToolCall, Mapping[str, Tool]]], timeout: float) -> list[ToolResult]:
    """`run_calls` where each call names the tools it may use (each episode calls its own environment's tools)."""
    results: list[ToolResult | None] = [_malformed(call, tools) for call, tools in calls]
    running: list[tuple[int, _Call]] = []
    for i, (call, tools) in enumerate(calls):
        if results[i] is None:
            worker = _Call(tools[call.name], dict(call.arguments or {}))  # type: ignore[index]
            worker.started_at = time.perf_counter()
            worker.start()
            running.append((i, worker))
    for i, worker in running:
        worker.join(max(0.0, worker.started_at + timeout - time.perf_counter()))
        if worker.outcome is None:  # still running: abandoned (see the module docstring)
            results[i] = ToolResult(worker.tool.name, f"Error: {worker.tool.name} timed out after {timeout:g} s",
                                    "timeout", time.perf_counter() - worker.started_at)
        else:
            results[i] = ToolResult(worker.tool.name, worker.outcome[1], worker.outcome[0], worker.latency)
    return [r for r in results if r is not None]
