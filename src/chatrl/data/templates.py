"""Chat templates: render messages with the tokenizer's own template, or a plain fallback.

The fallback (for tokenizers without a chat template, e.g. a base GPT-2) is the hh-rlhf style
"Human: ...\\n\\nAssistant: ...<eos>\\n\\n", so base models see the same format as the built-in data.
It is the one fallback, `models.loading.FALLBACK_CHAT_TEMPLATE` (models is the lower layer: `load_tokenizer`
installs it on such tokenizers and saved folders carry it), so rendering here and with a loaded tokenizer agree.
"""

from __future__ import annotations

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


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as template text (not tokenized). With add_generation_prompt the text ends
    where the model should start its reply (e.g. after "<|im_start|>assistant\\n")."""
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
    if not has_chat_template(tokenizer):
        kwargs["chat_template"] = FALLBACK_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as e:  # jinja raises TemplateError for e.g. "roles must alternate"
        raise ChatrlError(f"the tokenizer's chat template cannot render these messages ({type(e).__name__}: {e})") \
            from None
    return text if isinstance(text, str) else str(text)


def end_of_turn_text(tokenizer: Any) -> str:
    """The text that closes an assistant turn: the template's first special token after a reply."""
    probe = "\x00probe\x00"
    text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
    tail = text[text.find(probe) + len(probe):]
    return tail.rstrip() or (getattr(tokenizer, "eos_token", None) or "")
