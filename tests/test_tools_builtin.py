"""The built-in tools: the calculator against values worked out by hand, its refusals, the schemas
transformers builds from the docstrings, and the `python` tool's text (the sandbox itself: test_tools_sandbox.py)."""

from __future__ import annotations

import sys
import time

import pytest
from transformers.utils import get_json_schema

from chatrl.errors import ChatrlError
from chatrl.tools.builtin import BUILTIN_TOOLS, calculator, make_python_tool, python


@pytest.mark.parametrize(("expression", "expected"), [
    ("2*(3+4)", "14"),
    ("7/2", "3.5"),
    ("-3**2", "-9"),  # ** binds tighter than unary minus
    ("2**3**2", "512"),  # right-associative: 2**9
    ("7//2", "3"),
    ("-7//2", "-4"),  # floor, not truncation
    ("-7 % 3", "2"),
    (" 10 - 2 - 3 ", "5"),  # left-associative
    ("(1+2)*(3-5)", "-6"),
    ("2**-1", "0.5"),
    ("1.5*4", "6.0"),
    ("+5 - -2", "7"),
    ("2**10 % 1000", "24"),
])
def test_calculator_values(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize(("expression", "message"), [
    ("__import__('os')", "a function call is not allowed"),
    ("(1).__class__", r"attribute access \(.__class__\) is not allowed"),
    ("x + 1", "the name 'x' is not allowed"),
    ("'a' * 3", "the constant 'a' is not allowed"),
    ("True + 1", "the constant True is not allowed"),
    ("[1, 2]", "List"),
    ("1 < 2", "Compare"),
    ("lambda: 1", "Lambda"),
    ("1 +", "cannot parse"),
    ("1/0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("(-8)**0.5", "not a real number"),
    ("1e308 * 10", "too large"),
    ("2.0**100000", "too large"),
])
def test_calculator_refuses_with_a_clear_message(expression, message):
    with pytest.raises(ValueError, match=message):
        calculator(expression)


@pytest.mark.parametrize("expression", ["9**9**9", "10**10**10", "(2**4000)*(2**4000)", "3**5000"])
def test_calculator_refuses_huge_numbers_quickly(expression):
    start = time.monotonic()
    with pytest.raises(ValueError, match="too large"):
        calculator(expression)
    assert time.monotonic() - start < 0.5


def test_calculator_limits_the_expression_length():
    assert calculator("+".join(["1"] * 100)) == "100"
    with pytest.raises(ValueError, match="longer than 300 characters"):
        calculator("+".join(["1"] * 200))


def test_calculator_schema_from_its_docstring():
    schema = get_json_schema(calculator)
    assert schema["type"] == "function"
    function = schema["function"]
    assert function["name"] == "calculator"
    assert function["description"].startswith("Evaluate an arithmetic expression and return the result.")
    assert function["parameters"] == {
        "type": "object",
        "properties": {"expression": {"type": "string",
                                      "description": 'The arithmetic expression, for example "2*(3+4) - 5/2".'}},
        "required": ["expression"],
    }


def test_python_schema_is_the_same_for_every_limit():
    schema = get_json_schema(python)
    assert schema["function"]["name"] == "python"
    assert schema["function"]["parameters"]["properties"] == {"code": {
        "type": "string", "description": 'The Python source code to run, for example "print(sum(range(10)))".'}}
    assert schema["function"]["parameters"]["required"] == ["code"]
    assert get_json_schema(make_python_tool(timeout_s=1, memory_mb=128)) == schema


def test_builtin_tools_by_name():
    assert BUILTIN_TOOLS == {"calculator": calculator, "python": python}


linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox's limits are Linux's")


@linux_only
def test_python_returns_stdout_then_stderr():
    assert python("import sys\nprint(6 * 7)\nprint('careful', file=sys.stderr)") == "42\ncareful"
    assert python("x = 1") == "(no output)"


@linux_only
def test_python_reports_errors_exit_status_timeouts_and_truncation():
    error = python("print('before')\n1/0")
    assert error.startswith("before\nTraceback") and error.endswith("ZeroDivisionError: division by zero")
    assert python("import sys\nsys.exit(3)") == "[exit status 3]"
    assert make_python_tool(timeout_s=1)("while True:\n    pass") == "[timed out after 1 s]"
    long = make_python_tool(output_limit=100)("print('x' * 5000)")
    assert long == "x" * 100 + "\n[output truncated]"


def test_make_python_tool_refuses_bad_limits():
    with pytest.raises(ChatrlError, match="python tool: timeout_s must be a positive number, got 0"):
        make_python_tool(timeout_s=0)
    with pytest.raises(ChatrlError, match="memory_mb"):
        make_python_tool(memory_mb=-1)
