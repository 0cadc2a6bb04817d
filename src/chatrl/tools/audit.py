"""The chat-template audit run before episodes with tools (and by `chatrl env check`).

An episode's tokens are the prompt, the model's sampled replies and the environment's tokens between them, found by
rendering the conversation again after each message (`rollout.episodes.continuation_ids`). That is only the
sequence a later render would give when each render extends the previous one token for token: a template that
re-renders earlier turns once a tool call or a tool result follows (drops them, moves the tools block, marks the last
turn) would train the model on a conversation it never sees. The audit renders a sample conversation with two tool
calls and their results message by message and stops at the first render that changes an earlier token.
"""

from __future__ import annotations

from typing import Any

from chatrl.data.templates import render
from chatrl.data.types import Message
from chatrl.errors import ChatrlError
from chatrl.tools.parsers import format_call
from chatrl.tools.schema import example_arguments
from chatrl.tools.toolbox import ToolBox


def sample_conversation(box: ToolBox) -> list[Message]:
    """user, a tool call, its result, an answer, user, another call, its result, a last answer."""
    tool = next(iter(box.tools.values()))
    call = format_call(box.parser_name, tool.name, example_arguments(tool))
    result = {"role": "tool", "name": tool.name, "content": "3"}
    return [{"role": "user", "content": "What is 1 + 2? Use a tool."}, {"role": "assistant", "content": call},
            result, {"role": "assistant", "content": "The answer is 3."}, {"role": "user", "content": "Once more?"},
            {"role": "assistant", "content": call}, result, {"role": "assistant", "content": "Still 3."}]


def _token(tokenizer: Any, ids: list[int], i: int) -> str:
    if i >= len(ids):
        return "<end of render>"
    return f"{tokenizer.convert_ids_to_tokens(ids[i])!r} (id {ids[i]})"


def audit_template(tokenizer: Any, box: ToolBox) -> None:
    """Raise a one-line ChatrlError at the first message whose render changes a token of the render before it."""
    messages = sample_conversation(box)
    previous: list[int] | None = None
    for k in range(1, len(messages) + 1):
        prompt = k < len(messages) and messages[k]["role"] == "assistant"  # where the model would reply next
        text = render(tokenizer, messages[:k], add_generation_prompt=prompt, tools=box.schemas)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if previous is not None and ids[:len(previous)] != previous:
            i = next((j for j, (a, b) in enumerate(zip(previous, ids, strict=False)) if a != b), min(len(previous), len(ids)))
            raise ChatrlError(
                f"chat template audit: adding message {k} ({messages[k - 1]['role']}) changes token {i} of the "
                f"conversation before it: {_token(tokenizer, previous, i)} became {_token(tokenizer, ids, i)}; "
                "episodes with tools need a template that renders a conversation as an extension of its earlier "
                "turns (use another chat template, or no tools)")
        previous = ids
