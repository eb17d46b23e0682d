"""The calculator tool the model calls with `<|python_start|> expr <|python_end|>`.

The expression is parsed with `ast` and walked by a small evaluator that knows only:
numbers, + - * / // % **, parentheses, unary minus/plus, and `'literal'.count('x')`
(the spelling tasks count letters with it). There is no `eval`, no names, no attribute
other than `.count` on a string literal, and hard limits on the expression's length,
the size of exponents and numbers, and the time spent, so nothing the model writes can
hang or hurt the process. Thousands separators between digits ("1,000") are removed
first, as GSM8K writes them.

`calculator(expr)` returns the result as the text the model should see (integer-valued
results without ".0": "10", not "10.0"), or None when the expression is refused;
`evaluate(expr)` raises `CalculatorError` with the reason instead.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import time

MAX_EXPRESSION_CHARS = 256
MAX_NODES = 128  # AST nodes: bounds nesting and work
MAX_INT_BITS = 1024  # ~308 decimal digits, about the float range
MAX_EXPONENT = 1024
MAX_SECONDS = 0.05

_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Pow: operator.pow,
               ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# Quoted literals are left alone when removing thousands separators.
_STRING_LITERAL = re.compile(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")  # escaped quotes stay inside
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class CalculatorError(ValueError):
    """The expression is not something the calculator evaluates; the message says why."""


def calculator(expr: str) -> str | None:
    """The result of `expr` as text, or None if it is refused (see module docstring)."""
    try:
        return format_number(evaluate(expr))
    except CalculatorError:
        return None


def evaluate(expr: str) -> int | float:
    """Evaluate a whitelisted arithmetic expression; raises CalculatorError on anything else."""
    if not isinstance(expr, str):
        raise CalculatorError(f"expression must be a string, got {type(expr).__name__}")
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression is {len(expr)} characters; the limit is {MAX_EXPRESSION_CHARS}")
    expr = strip_thousands_separators(expr).strip()
    if not expr:
        raise CalculatorError("empty expression")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CalculatorError(f"not an expression: {type(e).__name__}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError(f"expression has more than {MAX_NODES} parts")
    try:
        value = _eval_node(tree.body, time.monotonic() + MAX_SECONDS)
    except (ZeroDivisionError, OverflowError) as e:
        raise CalculatorError(str(e)) from None
    except RecursionError:
        raise CalculatorError("expression is nested too deeply") from None
    if isinstance(value, str):
        raise CalculatorError("the result is a string, not a number")
    return value


def strip_thousands_separators(expr: str) -> str:
    """'1,000 * 2' -> '1000 * 2', leaving quoted literals untouched."""
    pieces = _STRING_LITERAL.split(expr)
    # split() with a capturing group alternates: outside, literal, outside, ...
    return "".join(p if i % 2 else _THOUSANDS_COMMA.sub("", p) for i, p in enumerate(pieces))


def format_number(value: float) -> str:
    """10 -> '10', 10.0 -> '10', 2.5 -> '2.5', 1/3 -> '0.333333333333', 123456789012345.67 as is.

    Twelve significant digits hide float noise (0.1 + 0.2 -> '0.3'); where that would need an
    exponent, and so drop digits of a large or tiny number, Python's repr (shortest exact) is used.
    """
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e16:
            return str(int(value))
        short = format(value, ".12g")
        return repr(value) if "e" in short else short
    return str(value)


def _eval_node(node: ast.AST, deadline: float) -> int | float | str:
    if time.monotonic() > deadline:
        raise CalculatorError("took too long")
    if isinstance(node, ast.Constant):
        # bool is an int subclass and complex a number: neither belongs in arithmetic here.
        if type(node.value) in (int, float):
            return _checked(node.value)
        if isinstance(node.value, str):
            return node.value
        raise CalculatorError(f"constant {node.value!r} is not a number or a string")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_number(node.operand, deadline))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _number(node.left, deadline), _number(node.right, deadline)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _checked(_BINARY_OPS[type(node.op)](left, right))
    if isinstance(node, ast.Call):
        return _eval_count(node)
    raise CalculatorError(f"{type(node).__name__} is not allowed; only numbers, + - * / // % ** and 'text'.count('x')")


def _number(node: ast.AST, deadline: float) -> int | float:
    value = _eval_node(node, deadline)
    if isinstance(value, str):
        raise CalculatorError("strings are only allowed as 'text'.count('x')")
    return value


def _eval_count(node: ast.Call) -> int:
    """'strawberry'.count('r'): a string literal, the attribute count, one string literal argument."""
    func = node.func
    if not (isinstance(func, ast.Attribute) and func.attr == "count"):
        raise CalculatorError("the only call allowed is 'text'.count('x')")
    if not (isinstance(func.value, ast.Constant) and isinstance(func.value.value, str)):
        raise CalculatorError(".count must be called on a string literal")
    arg = node.args[0] if len(node.args) == 1 and not node.keywords else None
    if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
        raise CalculatorError(".count takes exactly one string argument")
    return func.value.value.count(arg.value)


def _check_power(base: float, exponent: float) -> None:
    """Refuse powers whose result would be huge before computing them (9**9**9 must not run)."""
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {exponent} is larger than {MAX_EXPONENT}")
    if abs(base) > 1 and abs(exponent) * math.log2(abs(base)) > MAX_INT_BITS:
        raise CalculatorError("the power is too large")
    if base == 0 and exponent < 0:
        raise CalculatorError("0 cannot be raised to a negative power")


def _checked(value: float) -> int | float:
    if isinstance(value, complex):
        raise CalculatorError("the result is a complex number")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError("the number is too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is not a finite number")
    return value
