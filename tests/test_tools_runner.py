"""Tools: schemas from type hints and docstrings, calls run concurrently under a timeout, and every way a call can go
wrong (raises, hangs, returns no text, malformed) is an error result that is counted, never an exception."""

from __future__ import annotations

import time

import pytest

from chatrl.config_rl import GRPOConfig
from chatrl.configbase import load_config
from chatrl.errors import ChatrlError
from chatrl.tools.parsers import ToolCall
from chatrl.tools.runner import MAX_RESULT_CHARS, ToolResult, as_text, run_calls
from chatrl.tools.schema import argument_problem, example_arguments, resolve_tools
from chatrl.tools.stats import tool_metrics
from chatrl.tools.toolbox import ToolOptions, toolbox_for
from tool_fixtures import RELEASE, AddEnv, add, explode, hang, slow_add, unprintable


def tools_by_name(*fns):
    return {t.name: t for t in resolve_tools(list(fns), "test")}


def test_schema_comes_from_type_hints_and_docstring():
    [tool] = resolve_tools([add], "env.tools")
    fn = tool.schema["function"]
    assert tool.name == "add" and fn["description"] == "Add two integers."
    assert fn["parameters"]["properties"]["a"] == {"type": "integer", "description": "The first number."}
    assert fn["parameters"]["required"] == ["a", "b"]
    assert example_arguments(tool) == {"a": 2, "b": 2}


def test_tools_by_name_spec_and_schema_pair():
    schema = {"type": "function", "function": {"name": "plus", "description": "a + b", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a"]}}}
    tools = resolve_tools(["calculator", "python", "tool_fixtures:slow_add", (schema, add)], "env.tools")
    assert [t.name for t in tools] == ["calculator", "python", "slow_add", "plus"]
    assert tools[0].fn("2*(3+4)") == "14"


@pytest.mark.parametrize(("items", "needle"), [
    (["no_such_tool"], "unknown tool 'no_such_tool'"),
    (["tool_fixtures:no_docstring"], "tool 'no_docstring' has no usable schema"),
    ([add, add], "add declared twice"),
    ([({"type": "function", "function": {}}, add)], "not an OpenAI function schema"),
    ([42], "is not a tool"),
])
def test_bad_tool_declarations_are_one_line_naming_the_setting(items, needle):
    with pytest.raises(ChatrlError) as err:
        resolve_tools(items, "env.tools")
    assert needle in str(err.value) and str(err.value).startswith("env.tools") and "\n" not in str(err.value)


def test_arguments_are_checked_against_the_schema():
    [tool] = resolve_tools([add], "t")
    assert argument_problem(tool, {"a": 1, "b": 2}) is None
    assert "missing required argument(s): b" in argument_problem(tool, {"a": 1})
    assert "has no argument(s) c" in argument_problem(tool, {"a": 1, "b": 2, "c": 3})
    assert "argument b of add must be integer, got str" in argument_problem(tool, {"a": 1, "b": "2"})
    assert "must be integer, got bool" in argument_problem(tool, {"a": 1, "b": True})
    assert "must be a JSON object" in argument_problem(tool, [1, 2])


def test_calls_that_go_wrong_become_counted_error_results():
    tools = tools_by_name(add, explode, hang, unprintable)
    calls = [ToolCall("add", {"a": 2, "b": 3}), ToolCall("explode", {"a": 1}), ToolCall("hang", {"a": 1}),
             ToolCall("unprintable", {"a": 1}), ToolCall("nope", {}), ToolCall(None, None, "not valid JSON"),
             ToolCall("add", {"a": 1})]
    RELEASE.clear()
    t0 = time.perf_counter()
    results = run_calls(calls, tools, timeout=0.3)
    elapsed = time.perf_counter() - t0
    RELEASE.set()
    assert elapsed < 2.0  # the hanging tool cost its timeout, not its 60 s
    assert [r.status for r in results] == ["ok", "error", "timeout", "error", "malformed", "malformed", "malformed"]
    assert results[0].content == "5"
    assert results[1].content == "Error: explode raised RuntimeError: the tool broke / second line"
    assert results[2].content == "Error: hang timed out after 0.3 s" and results[2].latency >= 0.3
    assert "cannot be shown as text" in results[3].content
    assert "unknown tool 'nope'" in results[4].content and "add, explode, hang, unprintable" in results[4].content
    assert results[5].content == "Error: not valid JSON"
    assert "missing required argument(s): b" in results[6].content


def test_calls_run_concurrently():
    tools = tools_by_name(slow_add)
    t0 = time.perf_counter()
    results = run_calls([ToolCall("slow_add", {"a": i, "b": 1}) for i in range(4)], tools, timeout=10)
    assert [r.content for r in results] == ["1", "2", "3", "4"]
    assert time.perf_counter() - t0 < 1.2  # 4 x 0.4 s one after the other would be 1.6 s


def test_result_text_of_values():
    assert as_text({"x": [1, 2]}) == '{"x": [1, 2]}' and as_text(2.5) == "2.5" and as_text(None) == "null"
    assert as_text("a" * (MAX_RESULT_CHARS + 10)).endswith("...[truncated]")
    with pytest.raises(UnicodeEncodeError):
        as_text("\ud800")  # a lone surrogate cannot be tokenized


def test_tool_metrics_by_hand():
    results = [[ToolResult("add", "5", "ok", 0.2), ToolResult("add", "E", "timeout", 1.0)],
               [], [ToolResult("?", "E", "malformed"), ToolResult("calc", "E", "error", 0.5)]]
    m = tool_metrics(results, ["add", "calc", "python"])
    assert m == {"tool/calls": 4, "tool/errors": 3, "tool/timeouts": 1, "tool/malformed": 1,
                 "tool/calls_per_episode": 4 / 3, "tool/latency_s/add": pytest.approx(0.6),
                 "tool/latency_s/calc": 0.5, "tool/latency_s/python": 0.0}
    # two ranks: counts and latency sums are summed before the means
    twice = tool_metrics(results, ["add"], reduce=lambda v, sums: {k: 2 * x for k, x in v.items()})
    assert twice["tool/calls"] == 8 and twice["tool/calls_per_episode"] == 4 / 3
    assert twice["tool/latency_s/add"] == pytest.approx(0.6)


def test_toolbox_joins_env_and_config_tools_and_checks_options():
    box = toolbox_for(AddEnv(), "adder", ToolOptions(tools=["calculator"]))
    assert box.names == ["add", "calculator"] and box.max_calls == 4
    assert toolbox_for(AddEnv(tools=()), "adder") is None  # no tools: episodes play as before
    with pytest.raises(ChatrlError, match="already declared by environment 'adder'"):
        toolbox_for(AddEnv(), "adder", ToolOptions(tools=["tool_fixtures:add"]))
    with pytest.raises(ChatrlError, match="env.tool_timeout=0"):
        toolbox_for(AddEnv(), "adder", ToolOptions(tool_timeout=0))
    with pytest.raises(ChatrlError, match="env.max_tool_calls=-1"):
        toolbox_for(AddEnv(), "adder", ToolOptions(max_tool_calls=-1))


@pytest.mark.parametrize(("override", "needle"), [
    ("env.max_tool_calls=-1", "env.max_tool_calls=-1 must be >= 0"),
    ("env.tool_timeout=0", "env.tool_timeout=0.0 must be a positive number"),
    ("env.tool_error_penalty=-1", "env.tool_error_penalty=-1.0 must be >= 0"),
    ("env.tool_parser=xml", "env.tool_parser='xml'"),
])
def test_the_config_checks_the_tool_options(override, needle):
    with pytest.raises(ChatrlError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        load_config(GRPOConfig, None, ["env.name=arithmetic", "env.tools=[calculator]", override])
    cfg = load_config(GRPOConfig, None, ["env.name=arithmetic", "env.tools=[calculator]"])
    assert cfg.env.tools == ["calculator"] and cfg.env.max_tool_calls == 4 and cfg.env.tool_parser == "auto"
