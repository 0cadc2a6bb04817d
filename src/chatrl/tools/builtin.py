"""The built-in tools an environment can name: `calculator` (safe arithmetic) and `python` (sandboxed code).

Both are plain callables with type hints and Google-style docstrings, so `transformers.utils.get_json_schema`
gives their function-calling schema. A bad call raises ValueError with a message meant for the model; the tool
runner turns it into the error text the model sees.
"""

from __future__ import annotations

import ast
import math
import operator
import signal
from collections.abc import Callable

from chatrl.errors import ChatrlError
from chatrl.tools.sandbox import SandboxResult, run_python

MAX_EXPRESSION_CHARS = 300
MAX_RESULT_BITS = 4096  # ~1,200 decimal digits: a bound on every integer the calculator builds (9**9**9 is refused)
BINARY_OPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
UNARY_OPS: dict[type, Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
ALLOWED = "numbers, + - * / // % **, unary minus and parentheses"


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return the result.

    Supports numbers, + - * / // % ** (power), unary minus and parentheses, with Python's precedence
    (so -3**2 is -9 and 7/2 is 3.5). No variables or functions.

    Args:
        expression: The arithmetic expression, for example "2*(3+4) - 5/2".

    Returns:
        The value of the expression, as text.
    """
    if not isinstance(expression, str):
        raise ValueError(f"calculator: expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"calculator: expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as error:
        raise ValueError(f"calculator: cannot parse {expression!r}: {error.msg}; use {ALLOWED}") from None
    return str(_evaluate(tree.body))


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # not bool, complex or str
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPS:
        return _checked(UNARY_OPS[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _checked(BINARY_OPS[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ValueError("calculator: division by zero") from None
        except OverflowError:
            raise ValueError("calculator: result too large") from None
    raise ValueError(f"calculator: {_describe(node)} is not allowed; use {ALLOWED}")


def _check_power(base: int | float, exponent: int | float) -> None:
    """Refuse a power whose integer result would pass MAX_RESULT_BITS before computing it."""
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and exponent > 0:
        if abs(exponent) * (abs(base).bit_length() - 1) > MAX_RESULT_BITS:
            raise ValueError(f"calculator: {base}**{exponent} is too large (results are limited to "
                             f"{MAX_RESULT_BITS} bits)")


def _checked(value: object) -> int | float:
    if isinstance(value, complex):  # e.g. (-8)**0.5
        raise ValueError("calculator: the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("calculator: result too large")
    if isinstance(value, int) and value.bit_length() > MAX_RESULT_BITS:
        raise ValueError(f"calculator: result too large (limited to {MAX_RESULT_BITS} bits)")
    return value


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Call):
        return "a function call"
    if isinstance(node, ast.Attribute):
        return f"attribute access (.{node.attr})"
    if isinstance(node, ast.Name):
        return f"the name {node.id!r}"
    if isinstance(node, ast.Constant):
        return f"the constant {node.value!r}"
    return f"{type(node).__name__} ({ast.unparse(node)[:40]})"


def make_python_tool(*, timeout_s: float = 5.0, memory_mb: int = 512, output_limit: int = 4000,
                     max_procs: int = 64, file_size_mb: int = 16) -> Callable[[str], str]:
    """The `python` tool with other limits: same name, docstring and schema as `BUILTIN_TOOLS["python"]`."""
    for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("output_limit", output_limit),
                        ("max_procs", max_procs), ("file_size_mb", file_size_mb)):
        if not isinstance(value, (int, float)) or value <= 0:
            raise ChatrlError(f"python tool: {name} must be a positive number, got {value!r}")

    def python(code: str) -> str:
        """Run Python code in a sandbox and return what it printed (stdout, then stderr).

        The code runs in a fresh process with the standard library only, no network, a temporary working
        directory (files elsewhere cannot be written) and limits on time, memory and output. Use print()
        to show results.

        Args:
            code: The Python source code to run, for example "print(sum(range(10)))".

        Returns:
            The printed output and any error, as text.
        """
        if not isinstance(code, str):
            raise ValueError(f"python: code must be a string, got {type(code).__name__}")
        result = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb, output_limit=output_limit,
                            max_procs=max_procs, file_size_mb=file_size_mb)
        return format_result(result, timeout_s, output_limit)

    return python


def format_result(result: SandboxResult, timeout_s: float, output_limit: int) -> str:
    """stdout then stderr, cut to `output_limit` characters, with a note on a timeout, truncation or exit status."""
    text = result.stdout + result.stderr
    notes = []
    if len(text) > output_limit or result.truncated:
        text = text[:output_limit]
        notes.append("[output truncated]")
    code = result.exit_code or 0
    if result.timed_out:
        notes.append(f"[timed out after {timeout_s:g} s]")
    elif code < 0 and not result.truncated:  # the sandbox kills on truncation itself: nothing to add then
        notes.append(f"[killed: {signal.strsignal(-code) or -code}]")
    elif code > 0 and not result.stderr:  # an exception already shows its traceback
        notes.append(f"[exit status {code}]")
    if not text and not notes:
        return "(no output)"
    return "\n".join([text.rstrip("\n"), *notes]).strip("\n")


python = make_python_tool()

BUILTIN_TOOLS: dict[str, Callable[..., str]] = {"calculator": calculator, "python": python}
