"""Tool-call parsers: each format's well-formed calls, its malformed ones (an error, not an exception), replies
without calls, user parsers by spec."""

from __future__ import annotations

import pytest

from chatrl.errors import ChatrlError
from chatrl.tools.parsers import (
    ToolCall,
    format_call,
    load_parser,
    parse_auto,
    parse_hermes,
    parse_llama3,
    parse_mistral,
)


def test_hermes_calls_one_per_block_with_string_or_object_arguments():
    text = ('Let me compute.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n'
            '<tool_call>{"name": "calc", "arguments": "{\\"expression\\": \\"1+1\\"}"}</tool_call>')
    assert parse_hermes(text) == [ToolCall("add", {"a": 2, "b": 3}), ToolCall("calc", {"expression": "1+1"})]
    # the model stopped at EOS before closing the block: the rest of the reply is the call
    assert parse_hermes('<tool_call>{"name": "add", "arguments": {}}') == [ToolCall("add", {})]
    assert parse_hermes("The answer is 5.") == []


@pytest.mark.parametrize(("text", "needle"), [
    ('<tool_call>{"name": "add", "arguments": {"a": 2</tool_call>', "not valid JSON"),
    ('<tool_call>{"arguments": {"a": 2}}</tool_call>', 'needs a "name"'),
    ('<tool_call>["add"]</tool_call>', "must be a JSON object"),
    ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', "must be a JSON object, got list"),
    ('<tool_call>{"name": "add", "arguments": "{oops"}</tool_call>', "arguments of add are not valid JSON"),
])
def test_malformed_hermes_calls_are_errors(text, needle):
    [call] = parse_hermes(text)
    assert call.arguments is None and needle in call.error


def test_llama3_json_calls():
    assert parse_llama3('{"name": "add", "parameters": {"a": 1, "b": 2}}') == [ToolCall("add", {"a": 1, "b": 2})]
    assert parse_llama3('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}') == \
        [ToolCall("a", {}), ToolCall("b", {"x": 1})]
    [bad] = parse_llama3('{"name": "add", "parameters": {"a": 1')
    assert bad.error and "not valid JSON" in bad.error
    assert parse_llama3("It is 3.") == []


def test_mistral_list_and_args_forms():
    assert parse_mistral('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}]') == \
        [ToolCall("add", {"a": 1, "b": 2})]
    assert parse_mistral('[TOOL_CALLS]add[ARGS]{"a": 4, "b": 5}') == [ToolCall("add", {"a": 4, "b": 5})]
    [bad] = parse_mistral("[TOOL_CALLS] [{'name': 'add'}]")
    assert "not a valid JSON list" in bad.error
    [bad] = parse_mistral("[TOOL_CALLS]add[ARGS]{a: 1}")
    assert bad.name == "add" and "not valid JSON" in bad.error
    assert parse_mistral("no calls") == []


def test_auto_reads_every_format_and_leaves_prose_alone():
    for fmt in ("hermes", "llama3", "mistral"):
        assert parse_auto(format_call(fmt, "add", {"a": 1, "b": 2})) == [ToolCall("add", {"a": 1, "b": 2})], fmt
    assert parse_auto("The set {1, 2} has 2 elements.") == []
    assert parse_auto("The answer is 5.") == []


def test_user_parser_by_spec_and_its_failures_become_malformed_calls():
    parse = load_parser("tool_fixtures:bracket_parser")
    assert parse("CALL add 2 3") == [ToolCall("add", {"a": 2, "b": 3})] and parse("five") == []
    [call] = load_parser("tool_fixtures:broken_parser")("anything")
    assert call.name is None and "raised KeyError" in call.error
    [call] = load_parser("tool_fixtures:every_reply_calls")("x")  # dicts are accepted too
    assert call == ToolCall("calculator", {"expression": "1+1"})


def test_unknown_parser_is_one_line_naming_the_setting():
    with pytest.raises(ChatrlError, match="env.tool_parser='xml'"):
        load_parser("xml")
    with pytest.raises(ChatrlError, match="env.tool_parser"):
        load_parser("tool_fixtures:no_such_parser")
