"""Chat templates: render messages with the tokenizer's own template, or a plain fallback.

The fallback (for tokenizers without a chat template, e.g. a base GPT-2) is the hh-rlhf style
"Human: ...\\n\\nAssistant: ...<eos>\\n\\n", so base models see the same format as the built-in data.
It is the one fallback, `models.loading.FALLBACK_CHAT_TEMPLATE` (models is the lower layer: `load_tokenizer`
installs it on such tokenizers and saved folders carry it), so rendering here and with a loaded tokenizer agree.

Tools (`render(..., tools=schemas)`, OpenAI function schemas): a template that uses transformers' `tools` variable
gets them as such and shows them in its own format. A template that ignores it (SmolLM2's, the fallback) gets the
documented fallback instead: the schemas and the call format `<tool_call>{"name": ..., "arguments": {...}}
</tool_call>` in the system message (appended to the conversation's own, or a new one). A template that drops the
"tool" role (the fallback) shows tool results as user turns `<tool_response>...</tool_response>`.
"""

from __future__ import annotations

import json
from typing import Any

from chatrl.data.types import Message
from chatrl.errors import ChatrlError
from chatrl.models.loading import FALLBACK_CHAT_TEMPLATE


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def template_of(tokenizer: Any) -> str:
    """The template text used for `tokenizer` (its own, else FALLBACK_CHAT_TEMPLATE); part of cache keys."""
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):  # several named templates: the default one is used
        tpl = tpl.get("default") or next(iter(tpl.values()))
    return tpl or FALLBACK_CHAT_TEMPLATE


TOOLS_FALLBACK = ("You can call tools. To call one, reply with only\n<tool_call>\n{{\"name\": <tool name>, "
                  "\"arguments\": <JSON object>}}\n</tool_call>\nand its result comes back in the next message. "
                  "Tools (JSON schemas):\n<tools>\n{tools}\n</tools>")
_PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool_x7", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}
_SUPPORT: dict[tuple[str, str], bool] = {}  # (template, what) -> whether the template renders it (probed once)


def _apply(tokenizer: Any, messages: list[Message], add_generation_prompt: bool, tools: list[dict] | None) -> str:
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
    if not has_chat_template(tokenizer):
        kwargs["chat_template"] = FALLBACK_CHAT_TEMPLATE
    if tools:
        kwargs["tools"] = tools
    try:
        text = tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as e:  # jinja raises TemplateError for e.g. "roles must alternate"
        raise ChatrlError(f"the tokenizer's chat template cannot render these messages ({type(e).__name__}: {e})") \
            from None
    return text if isinstance(text, str) else str(text)


def _supports(tokenizer: Any, what: str) -> bool:
    """Does the template show `what`: "tools" (the tools variable) or "tool_role" (a message with role tool)?"""
    key = (template_of(tokenizer), what)
    if key not in _SUPPORT:
        hi = {"role": "user", "content": "hi"}
        try:
            if what == "tools":
                _SUPPORT[key] = "probe_tool_x7" in _apply(tokenizer, [hi], False, [_PROBE_TOOL])
            else:
                _SUPPORT[key] = "probe_result_x7" in _apply(
                    tokenizer, [hi, {"role": "tool", "name": "f", "content": "probe_result_x7"}], False, None)
        except ChatrlError:
            _SUPPORT[key] = False
    return _SUPPORT[key]


def supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template shows tool schemas itself (transformers' `tools` variable)."""
    return _supports(tokenizer, "tools")


def with_tool_fallback(tokenizer: Any, messages: list[Message], tools: list[dict] | None) -> list[Message]:
    """The messages as the template gets them: the tools in the system message when the template ignores `tools`,
    tool results as user turns when it drops the tool role; unchanged otherwise."""
    out = list(messages)
    if tools and not supports_tools(tokenizer):
        text = TOOLS_FALLBACK.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    if any(m["role"] == "tool" for m in out) and not _supports(tokenizer, "tool_role"):
        out = [{"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
               if m["role"] == "tool" else m for m in out]
    return out


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False,
           tools: list[dict] | None = None) -> str:
    """The conversation as template text (not tokenized). With add_generation_prompt the text ends
    where the model should start its reply (e.g. after "<|im_start|>assistant\\n"). `tools`: OpenAI function
    schemas offered to the model (see the module docstring for templates without tool support)."""
    return _apply(tokenizer, with_tool_fallback(tokenizer, messages, tools), add_generation_prompt, tools)


def end_of_turn_text(tokenizer: Any) -> str:
    """The text that closes an assistant turn: the template's first special token after a reply."""
    probe = "\x00probe\x00"
    text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
    tail = text[text.find(probe) + len(probe):]
    return tail.rstrip() or (getattr(tokenizer, "eos_token", None) or "")
