"""Demonstrations from an environment's own reference solutions (`chatrl env demos`, the pipeline's `sft_demos`):
chat rows for SFT that show the model how an episode is solved, tool calls included.

An environment that can write a reference solution has a method `solution(tools) -> list[ToolCall | str]`, called
after reset() with the names of the tools offered: each `ToolCall` is a reply calling that tool, each string a
reply given to env.step(). The episode is played with them through the same machinery as training: a call is
written in the format `env.tool_parser` reads (`parsers.format_call`), parsed back and run by the `ToolBox` (so the
tool's real result is what the demonstration shows), and a reply is stepped. Only episodes that succeed (their
info's `success`, else a positive return) and whose calls all ran become rows, so a demonstration never teaches a
malformed call or a wrong answer.

Rows are chat rows {"messages": [...], "tools": [schemas]} (tool results as {"role": "tool", "name", "content"}
messages); SFT renders them with the tools (`render(..., tools=)`, the template's own format or the fallback in the
system message), so it trains on exactly what the episodes of a GRPO run with the same tools show the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from chatrl.data.types import Message
from chatrl.envs.base import call_env, tool_message, validate_reset, validate_step
from chatrl.envs.registry import make_env
from chatrl.errors import ChatrlError
from chatrl.paths import atomic_write
from chatrl.tools.parsers import ToolCall, format_call
from chatrl.tools.toolbox import ToolBox, ToolSettings, toolbox_for


def _steps(env: Any, env_name: str, tools: list[str]) -> list[ToolCall | str]:
    solve: Callable[[list[str]], object] | None = getattr(env, "solution", None)
    if not callable(solve):
        raise ChatrlError(f"environment '{env_name}' has no solution(tools) method, so no demonstrations can be "
                          "written for it (it must return the reference replies: ToolCall(name, arguments) for a "
                          "tool call, a string for a reply to step())")
    steps = call_env(env_name, "solution()", solve, tools)
    if not isinstance(steps, (list, tuple)) or not all(isinstance(s, (str, ToolCall)) for s in steps) or not steps:
        raise ChatrlError(f"environment '{env_name}' solution() returned {str(steps)[:80]}: expected a non-empty "
                          "list of ToolCall and str replies")
    return list(steps)


def play_solution(env: Any, env_name: str, split: str, task: int, seed: int,
                  box: ToolBox | None) -> list[Message] | None:
    """The conversation of one episode played with the environment's reference solution (tool messages included),
    or None when it failed (a call did not run, a call without tools, the episode did not succeed)."""
    first, _ = validate_reset(env_name, call_env(env_name, "reset()", env.reset, seed=seed,
                                                 options={"split": split, "task": task}))
    conversation, info, ret, done = list(first), {}, 0.0, False
    for step in _steps(env, env_name, box.names if box else []):
        if done:
            break
        if isinstance(step, ToolCall):
            if box is None:
                return None
            text = format_call(box.parser_name, step.name or "", step.arguments or {})
            results = box.run(box.calls_in(text))
            if not results or any(r.failed for r in results):
                return None
            conversation += [{"role": "assistant", "content": text},
                             *[tool_message(r.name, r.content) for r in results]]
            continue
        result = validate_step(env_name, call_env(env_name, "step()", env.step, step))
        conversation += [{"role": "assistant", "content": step}, *result.messages]
        info, ret, done = result.info, ret + result.reward, result.terminated or result.truncated
    if conversation[-1]["role"] != "assistant" and not done:
        return None
    return conversation if bool(info.get("success", ret > 0)) else None


def demo_rows(env_name: str, kwargs: dict[str, Any], n: int, settings: ToolSettings | None = None,
              split: str = "train", seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """`n` chat rows from tasks 0, 1, ... of `split` (a failed episode is skipped and the next task played)."""
    if n < 1:
        raise ChatrlError(f"demonstrations: n={n} must be at least 1")
    env = make_env(env_name, kwargs)
    box = toolbox_for(env, env_name, settings)
    tools = {"tools": box.schemas} if box is not None else {}
    rows, task = [], 0
    with tqdm(total=n, desc="demonstrations", disable=not progress) as bar:
        while len(rows) < n:
            if task >= 10 * n:
                raise ChatrlError(f"demonstrations for '{env_name}': only {len(rows)} of the first {task} reference "
                                  "solutions succeeded; check its solution() method")
            conversation = play_solution(env, env_name, split, task, seed + task, box)
            task += 1
            if conversation is not None:
                rows.append({"messages": conversation, **tools})
                bar.update()
    return rows


def write_demos(out: str | Path, env_name: str, kwargs: dict[str, Any], n: int,
                settings: ToolSettings | None = None, split: str = "train", seed: int = 0) -> Path:
    """Write `n` demonstrations as JSONL (chat schema with a tools column: `chatrl sft` reads it)."""
    rows = demo_rows(env_name, kwargs, n, settings, split, seed)
    return atomic_write(out, "".join(json.dumps(r) + "\n" for r in rows))
