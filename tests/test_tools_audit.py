"""Tool schemas reach the model through the chat template (its own tools format, or the system-message fallback),
and the template audit stops a template whose renders with tool calls and results do not extend each other."""

from __future__ import annotations

import pytest

from chatrl.data.templates import render, supports_tools
from chatrl.errors import ChatrlError
from chatrl.models.loading import load_tokenizer
from chatrl.tools.audit import audit_template, sample_conversation
from chatrl.tools.toolbox import ToolOptions, toolbox_for
from tool_fixtures import AddEnv

# ChatML that shows tools itself (as Qwen's does) and renders every message the same wherever it stands
TOOLS_CHATML = ("{% if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
                "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# drifts: only the latest tool result is shown, earlier ones are collapsed (the render after the model's answer
# changes the result it was given)
DRIFTING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'tool' and not loop.last %}"
            "(result){% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture()
def tok():
    return load_tokenizer("tiny-random")


def box(parser="auto"):
    return toolbox_for(AddEnv(), "adder", ToolOptions(tool_parser=parser))


def test_smollm2_template_has_no_tools_variable_so_the_fallback_carries_them(tok):
    assert not supports_tools(tok)
    text = render(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True, tools=box().schemas)
    assert text.startswith("<|im_start|>system\nYou can call tools. To call one, reply with only\n<tool_call>")
    assert '"name": "add"' in text and "You are a helpful AI assistant" not in text
    assert render(tok, [{"role": "user", "content": "hi"}]) .startswith("<|im_start|>system\nYou are a helpful")


def test_a_template_with_tools_gets_them_in_its_own_format(tok):
    tok.chat_template = TOOLS_CHATML
    assert supports_tools(tok)
    text = render(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                  tools=box().schemas)
    assert text.startswith("<|im_start|>system\n# Tools\n{") and "You can call tools" not in text
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text  # the conversation's own system message is untouched


@pytest.mark.parametrize("parser", ["auto", "hermes", "llama3", "mistral"])
def test_stable_templates_pass_the_audit_in_every_call_format(tok, parser):
    audit_template(tok, box(parser))
    tok.chat_template = TOOLS_CHATML
    audit_template(tok, box(parser))
    calls = [m for m in sample_conversation(box(parser)) if m["role"] == "assistant"][0]["content"]
    assert box(parser).calls_in(calls)[0].name == "add"  # the audit's sample call is one the parser reads


def test_a_drifting_template_stops_with_the_first_differing_token(tok):
    tok.chat_template = DRIFTING
    with pytest.raises(ChatrlError) as err:
        audit_template(tok, box())
    msg = str(err.value)
    assert msg.startswith("chat template audit: adding message 4 (assistant) changes token") and "\n" not in msg
    assert "'3' (id " in msg and "became '(" in msg  # the tool result the model read, then collapsed
