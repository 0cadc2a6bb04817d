"""One round of tool calls inside the turns of a rollout: find the calls in each reply, run the calls of all episodes
together (`tools.runner`: concurrent, each under env.tool_timeout, errors as results) and turn the results into the
tool messages the episodes append (`rollout.episodes` lays them out as environment tokens)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from chatrl.data.types import Message
from chatrl.envs.base import tool_message
from chatrl.tools.parsers import ToolCall
from chatrl.tools.runner import ToolResult, run_each
from chatrl.tools.schema import Tool
from chatrl.tools.toolbox import ToolBox


@dataclass
class ToolRound:
    """One episode's part of a round: the calling reply as the conversation keeps it, whether its EOS closed it,
    the tool messages that answer it and the results (for the counts)."""

    reply: str
    ended_with_eos: bool
    messages: list[Message]
    results: list[ToolResult]


def call_text(tokenizer: PreTrainedTokenizerBase, reply_ids: list[int]) -> tuple[str, bool]:
    """The reply's text with special tokens kept (Mistral's [TOOL_CALLS] and Llama's <|python_tag|> are special
    tokens) but its closing EOS dropped, and whether it ended with EOS."""
    ended = bool(reply_ids) and reply_ids[-1] == tokenizer.eos_token_id
    return tokenizer.decode(reply_ids[:-1] if ended else reply_ids, skip_special_tokens=False), ended


def tool_calls_of(box: ToolBox, tokenizer: PreTrainedTokenizerBase, reply_ids: list[int]) -> list[ToolCall]:
    """The tool calls in a generated reply (none: the reply goes to env.step())."""
    return box.calls_in(call_text(tokenizer, reply_ids)[0])


def run_round(replies: Sequence[tuple[list[int], list[ToolCall], int, Mapping[str, Tool]]], box: ToolBox,
              tokenizer: PreTrainedTokenizerBase) -> list[ToolRound]:
    """Answer each (reply ids, its calls, calls the turn may still make, its environment's tools) in one concurrent
    batch of calls. Calls past the turn's budget are not run: the model reads that the limit is reached (counted as
    errors)."""
    flat: list[tuple[ToolCall, Mapping[str, Tool]]] = []
    for _, calls, budget, tools in replies:
        flat += [(call, tools) for call in calls[:max(budget, 0)]]
    results = iter(run_each(flat, box.timeout))
    rounds = []
    for reply_ids, calls, budget, _ in replies:
        answered = [next(results) for _ in calls[:max(budget, 0)]]
        answered += [ToolResult(c.name or "?", f"Error: the limit of {box.max_calls} tool calls per turn is reached; "
                                "answer without tools", "error") for c in calls[max(budget, 0):]]
        text, ended = call_text(tokenizer, reply_ids)
        rounds.append(ToolRound(text, ended, [tool_message(r.name, r.content) for r in answered], answered))
    return rounds
