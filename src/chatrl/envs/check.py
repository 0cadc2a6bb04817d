"""`check_env`: drive an environment with scripted replies and list every way it breaks the contract.

Meant to be run before a long training run: it makes the environment, plays a few train and eval episodes with
replies a policy might produce (a number, a final-answer sentence, an empty string, a refusal), validates every
reset()/step() result, and checks the properties the trainer relies on (the problem depends only on
(split, task), episodes end, eval differs from train). Problems are returned as one line each, never raised.

An environment with tools: each tool is also called once with arguments built from its schema (result, latency,
errors; a tool that hangs is reported as a timeout after `tool_timeout` seconds), and the chat template of
`tokenizer` (a model or tokenizer folder, or a built-in alias) is audited with tool calls and results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gymnasium

from chatrl.data.types import Message
from chatrl.envs.base import call_env, validate_reset, validate_step
from chatrl.envs.registry import make_env
from chatrl.errors import ChatrlError
from chatrl.models.loading import load_tokenizer
from chatrl.tools.audit import audit_template
from chatrl.tools.parsers import ToolCall
from chatrl.tools.runner import ToolResult
from chatrl.tools.schema import example_arguments
from chatrl.tools.toolbox import ToolBox, ToolOptions, toolbox_for

ACTIONS = ["42", "The answer is 7.", "", "I don't know."]
MAX_DECLARED_TURNS = 64  # an environment's own max_turns is honoured up to this many turns
OTHER_SEED = 1_000_003  # reset twice with different seeds: the first observation must not change


@dataclass
class CheckReport:
    """What `check_env` saw: one entry per finished episode, plus the problems found."""

    problems: list[str] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    successes: list[bool] = field(default_factory=list)  # only episodes whose final info has "success"
    first: list[Message] = field(default_factory=list)  # the first observation of train task 0
    tools: list[tuple[ToolCall, ToolResult]] = field(default_factory=list)  # each declared tool played once

    def add(self, where: str, problem: str) -> None:
        """Record a problem once (the same failure in every episode is one line), prefixed by where it showed."""
        if not any(p.endswith(problem) for p in self.problems):
            self.problems.append(f"{where}: {problem}")


def _turn_limit(env: gymnasium.Env, max_turns: int) -> int:
    declared = getattr(env, "max_turns", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return max(max_turns, min(declared, MAX_DECLARED_TURNS))
    return max_turns


def _first(env: gymnasium.Env, name: str, split: str, task: int, seed: int) -> list[Message]:
    options = {"split": split, "task": task}
    messages, _ = validate_reset(name, call_env(name, "reset()", env.reset, seed=seed, options=options))
    return messages


def _episode(env: gymnasium.Env, name: str, split: str, task: int, seed: int, limit: int,
             report: CheckReport) -> list[Message]:
    """Play one episode; returns its first observation."""
    again = _first(env, name, split, task, seed + OTHER_SEED)
    first = _first(env, name, split, task, seed)
    if not first:
        report.add(f"{split} task {task}", "reset() returned no messages: the first observation must carry the task")
    if again != first:
        report.add(f"{split} task {task}", "reset() with the same split and task but another seed gave a different "
                   "first observation: the problem must depend only on (split, task)")
    total = 0.0
    for turn in range(limit):
        action = ACTIONS[(task + turn) % len(ACTIONS)]
        result = validate_step(name, call_env(name, f"step({action!r})", env.step, action))
        total += result.reward
        if result.terminated or result.truncated:
            success = result.info.get("success")
            if success is not None and not isinstance(success, bool):
                report.add(f"{split} task {task}", f"info['success'] is {success!r} ({type(success).__name__}): "
                           "expected a bool")
            elif success is not None:
                report.successes.append(success)
            report.returns.append(total)
            report.turns.append(turn + 1)
            return first
    report.add(f"{split} task {task}", f"the episode did not end within {limit} turns (neither terminated nor "
               "truncated); end it or set the environment's max_turns")
    return first


def check_tools(box: ToolBox, report: CheckReport, tokenizer: str | None) -> None:
    """Call every tool once with arguments from its schema (all together, each under the timeout), then audit the
    chat template of `tokenizer` with tool calls and results."""
    calls = [ToolCall(name, example_arguments(tool)) for name, tool in box.tools.items()]
    for call, result in zip(calls, box.run(calls), strict=True):
        report.tools.append((call, result))
        if result.failed:
            report.add(f"tool {call.name}", f"called with {call.arguments}: {result.content}")
    if tokenizer is not None:
        try:
            audit_template(load_tokenizer(tokenizer), box)
        except ChatrlError as e:
            report.add(f"template of {tokenizer}", str(e).splitlines()[0])


def run_check(spec: str, kwargs: dict[str, Any] | None = None, episodes: int = 5, seed: int = 0,
              max_turns: int = 8, tool_timeout: float = 10.0, tokenizer: str | None = None) -> CheckReport:
    """Make the environment and play `episodes` train and `episodes` eval episodes (tasks 0..episodes-1); its
    tools, if it has any, are played and `tokenizer`'s chat template audited (`check_tools`)."""
    report = CheckReport()
    try:
        env = make_env(spec, kwargs)
        box = toolbox_for(env, spec, ToolOptions(tool_timeout=tool_timeout))
    except ChatrlError as e:
        report.problems.append(str(e).splitlines()[0])
        return report
    if box is not None:
        check_tools(box, report, tokenizer)
    limit = _turn_limit(env, max_turns)
    firsts: dict[str, list[list[Message] | None]] = {"train": [], "eval": []}
    for split in ("train", "eval"):
        for task in range(episodes):
            try:
                firsts[split].append(_episode(env, spec, split, task, seed + task, limit, report))
            except ChatrlError as e:
                firsts[split].append(None)
                report.add(f"{split} task {task}", str(e).splitlines()[0])
    report.first = next((f for f in firsts["train"] if f), [])
    # only judged when the first observation shows the problem (it varies with the task): a game that hides its
    # secret (guess_number) looks the same in both splits
    train = [f for f in firsts["train"] if f is not None]
    if len({repr(f) for f in train}) > 1:
        for task, (a, b) in enumerate(zip(firsts["train"], firsts["eval"], strict=True)):
            if a is not None and a == b:
                report.add(f"task {task}", "train and eval gave the same first observation: eval problems must be "
                           "held out from training (split='eval' in reset's options)")
    try:
        call_env(spec, "close()", env.close)
    except ChatrlError as e:
        report.add("close", str(e))
    return report


def check_env(spec: str, kwargs: dict[str, Any] | None = None, episodes: int = 5, seed: int = 0,
              max_turns: int = 8) -> list[str]:
    """The problems found (one line each); empty when the environment behaved."""
    return run_check(spec, kwargs, episodes, seed, max_turns).problems
