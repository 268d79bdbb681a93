"""A calculator tool: exact arithmetic the policy can call instead of computing digits itself.

Parsed with `ast` and evaluated node by node (never `eval`): a policy's text is untrusted, and even pure
arithmetic can hang a worker (`9**9**9`), so every step is bounded (input length, exponent, result size).
"""

from __future__ import annotations

import ast
import math
import operator

MAX_LENGTH = 200  # characters of expression
MAX_EXPONENT = 64  # |e| in a ** e
MAX_MAGNITUDE = 10**100  # every intermediate and final |result| stays below this

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _check_size(value: int | float) -> int | float:
    """Refuse a value that is non-finite or too big, so the next operation cannot blow up."""
    if isinstance(value, complex):
        raise ValueError("the result is a complex number (e.g. a negative base to a fractional power)")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("the result is not a finite number")
    if abs(value) >= MAX_MAGNITUDE:
        raise ValueError("the result is too large (|result| must stay below 10**100)")
    return value


def _power(base: int | float, exponent: int | float) -> int | float:
    """`base ** exponent`, refused before computing when it would exceed the bounds (so `9**9**9` is instant)."""
    if abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"exponent {exponent!r} is too large (|exponent| <= {MAX_EXPONENT})")
    if base == 0 and exponent < 0:
        raise ValueError("division by zero (0 to a negative power)")
    if base != 0 and exponent > 0 and exponent * math.log10(abs(base)) >= 100:
        raise ValueError("the result is too large (|result| must stay below 10**100)")
    return base**exponent


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ValueError(f"only numbers are allowed, got the literal {node.value!r}")
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _check_size(_power(left, right))
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ValueError("division by zero")
        return _check_size(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Name):
        raise ValueError(f"names are not allowed, got {node.id!r}")
    if isinstance(node, ast.Call):
        raise ValueError("function calls are not allowed")
    if isinstance(node, ast.Attribute):
        raise ValueError(f"attribute access is not allowed, got '.{node.attr}'")
    raise ValueError(f"{type(node).__name__} is not allowed (only numbers, + - * / // % **, parentheses)")


def _format(value: int | float) -> str:
    """Integral values print as ints ("6", not "6.0"); other floats keep 10 significant digits ("0.3333333333")."""
    if isinstance(value, int):
        return str(value)
    rounded = float(f"{value:.10g}")
    if rounded.is_integer() and abs(rounded) < 1e16:  # beyond 1e16 int() would print float noise digits
        return str(int(rounded))
    return repr(rounded)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly and return the result.

    Args:
        expression: Arithmetic on integer and decimal numbers with + - * / // % ** and parentheses, e.g. "123*456".

    Returns:
        The result as text, e.g. "56088".
    """
    if not isinstance(expression, str):
        raise ValueError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_LENGTH:
        raise ValueError(f"expression is too long ({len(expression)} characters, at most {MAX_LENGTH})")
    if not expression.strip():
        raise ValueError("expression is empty")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"expression {expression!r} is not valid arithmetic ({err.msg})") from None
    return _format(_evaluate(tree))
