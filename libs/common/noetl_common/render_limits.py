"""Bounds on what one template may build (docs/security.md, "Limits").

The Jinja sandbox stops a template from reaching engine internals, but not from asking Python for a
gigantic value: ``{{ 7 ** (10 ** 7) }}`` spends seconds of CPU in one bytecode (no thread switch, no timeout
can interrupt it) and ``{{ 'a' * 10 ** 9 }}`` allocates a gigabyte at once. Each operation that can grow a
value far beyond its operands is checked *before* it runs, from the sizes of its operands, and refused with
`LimitExceeded` (a TemplateError names the template). Pure: the checks are arithmetic on lengths.

What remains possible (loops over loops, large outputs built from many small pieces) is bounded by the
caller's time and size budget (the render service runs templates off the event loop with a deadline).
"""
from __future__ import annotations

import operator
import re
import string
from collections.abc import Callable
from typing import Any

__all__ = ["LimitExceeded", "MAX_INT_BITS", "MAX_ITEMS", "MAX_CHARS", "MAX_WIDTH",
           "binop", "check_call", "bounded_filters"]

MAX_INT_BITS = 1 << 16          # an integer of ~20,000 decimal digits: far beyond any real use
MAX_ITEMS = 1_000_000           # items of a list/tuple built by repetition
MAX_CHARS = 10_000_000          # characters of a string built by repetition, padding, replace or join
MAX_WIDTH = 10_000              # a field width or precision in %-formatting, str.format and padding

# a %-conversion's flags, width and precision: "%-08.3f" -> width "08", precision "3"
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?")
_DIGITS = re.compile(r"\d+")


class LimitExceeded(ValueError):
    """A template asked for a value over one of the limits above."""


def _refuse(what: str, size: int, limit: int) -> LimitExceeded:
    return LimitExceeded(f"{what} would be too large ({size:,} > {limit:,})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_power(base: Any, exp: Any) -> None:
    if _is_int(base) and _is_int(exp) and exp > 0 and abs(base) > 1:
        bits = (abs(base).bit_length() - 1) * exp      # a lower bound of the result's size
        if bits > MAX_INT_BITS:
            raise _refuse("the power's result in bits", bits, MAX_INT_BITS)


def _check_times(left: Any, right: Any) -> None:
    if _is_int(left) and _is_int(right):
        bits = left.bit_length() + right.bit_length()
        if bits > MAX_INT_BITS + 64:
            raise _refuse("the product in bits", bits, MAX_INT_BITS)
        return
    for seq, n in ((left, right), (right, left)):
        if _is_int(n) and isinstance(seq, (str, bytes, list, tuple)):
            size = len(seq) * n
            limit = MAX_CHARS if isinstance(seq, (str, bytes)) else MAX_ITEMS
            if size > limit:
                raise _refuse("the repetition", size, limit)


def _check_percent(fmt: Any) -> None:
    if not isinstance(fmt, str):
        return
    for match in _PERCENT_SPEC.finditer(fmt):
        for part in match.groups():
            if part == "*":
                raise LimitExceeded("a '*' width or precision is not allowed in %-formatting")
            if part and int(part) > MAX_WIDTH:
                raise _refuse("a %-format width or precision", int(part), MAX_WIDTH)


def _check_format_spec(spec: str) -> None:
    for digits in _DIGITS.findall(spec):
        if len(digits) > 6 or int(digits) > MAX_WIDTH:
            raise _refuse("a format width or precision", int(digits[:12]), MAX_WIDTH)


_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "**": operator.pow, "*": operator.mul, "%": operator.mod,
}
_CHECKS: dict[str, Callable[[Any, Any], None]] = {
    "**": _check_power, "*": _check_times, "%": lambda left, _right: _check_percent(left),
}
INTERCEPTED = frozenset(_BINOPS)


def binop(op: str, left: Any, right: Any) -> Any:
    """Run an intercepted binary operator after checking its result's size."""
    _CHECKS[op](left, right)
    return _BINOPS[op](left, right)


def _total_len(pieces: list[Any]) -> int:
    return sum(len(p) if isinstance(p, str) else 16 for p in pieces)


def _check_str_method(name: str, text: str, args: tuple, kwargs: dict) -> tuple:
    """Check a str method call; returns args (an iterable argument of join is made a list once)."""
    if name in ("ljust", "rjust", "center", "zfill") and args and _is_int(args[0]):
        if args[0] > MAX_CHARS:
            raise _refuse(f"str.{name}'s width", args[0], MAX_CHARS)
    elif name == "expandtabs":
        size = text.count("\t") * (args[0] if args and _is_int(args[0]) else 8) + len(text)
        if size > MAX_CHARS:
            raise _refuse("str.expandtabs' result", size, MAX_CHARS)
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        hits = len(text) + 1 if not args[0] else text.count(args[0])
        size = len(text) + hits * len(args[1])
        if size > MAX_CHARS:
            raise _refuse("str.replace's result", size, MAX_CHARS)
    elif name == "join" and args:
        pieces = list(args[0])
        size = _total_len(pieces) + len(text) * max(len(pieces) - 1, 0)
        if size > MAX_CHARS:
            raise _refuse("str.join's result", size, MAX_CHARS)
        args = (pieces, *args[1:])
    elif name in ("format", "format_map"):
        _check_format_string(text)
    return args


def _check_format_string(text: str) -> None:
    # nested fields ("{:{}}") take their width from an argument: refused, like '*' in %-formatting
    for _literal, _field, spec, _conv in string.Formatter().parse(text):
        if spec:
            if "{" in spec:
                raise LimitExceeded("a nested width or precision is not allowed in str.format")
            _check_format_spec(spec)


def check_call(obj: Any, args: tuple, kwargs: dict) -> tuple:
    """Check a call from a template before the sandbox makes it; returns the args to call with."""
    obj = getattr(obj, "__wrapped__", obj)      # the sandbox wraps str.format in a checking function
    owner = getattr(obj, "__self__", None)
    if isinstance(owner, str) and not isinstance(obj, type):
        return _check_str_method(getattr(obj, "__name__", ""), owner, args, kwargs)
    return args


def bounded_filters(filters: dict[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    """Jinja's padding, formatting and joining filters with the checks above in front."""
    center, indent, fmt, join = filters["center"], filters["indent"], filters["format"], filters["join"]

    def bounded_center(value: Any, width: int = 80) -> str:
        if _is_int(width) and width > MAX_CHARS:
            raise _refuse("center's width", width, MAX_CHARS)
        return center(value, width)

    def bounded_indent(value: Any, width: int | str = 4, *args: Any, **kwargs: Any) -> str:
        text = str(value)
        pad = width if _is_int(width) else len(str(width))
        size = len(text) + (text.count("\n") + 1) * pad
        if size > MAX_CHARS:
            raise _refuse("indent's result", size, MAX_CHARS)
        return indent(value, width, *args, **kwargs)

    def bounded_format(value: Any, *args: Any, **kwargs: Any) -> str:
        _check_percent(str(value))
        return fmt(value, *args, **kwargs)

    def bounded_join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
        if attribute is None:
            pieces = list(value)
            size = _total_len([str(p) if not isinstance(p, str) else p for p in pieces]) \
                + len(str(d)) * max(len(pieces) - 1, 0)
            if size > MAX_CHARS:
                raise _refuse("join's result", size, MAX_CHARS)
            value = pieces
        return join(eval_ctx, value, d, attribute)

    bounded_join.jinja_pass_arg = join.jinja_pass_arg       # type: ignore[attr-defined]
    return {"center": bounded_center, "indent": bounded_indent, "format": bounded_format,
            "join": bounded_join}
