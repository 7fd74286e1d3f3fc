"""Template rendering for the NoETL DSL (docs/playbook-dsl.md section 5).

Pure: no I/O, clock, env or randomness. Callables such as `now`/`uuid` are put into the
context by the caller where the DSL allows them, so a replayed fold renders identically.
"""

from __future__ import annotations

import base64
import json
import math
import re
import types
from collections.abc import Iterator, ItemsView, KeysView, Mapping, ValuesView
from typing import Any

from jinja2 import StrictUndefined, meta, nodes
from jinja2 import TemplateSyntaxError as _JinjaSyntaxError
from jinja2.exceptions import TemplateError as _JinjaError
from jinja2.runtime import Context, missing
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import object_type_repr

from . import render_limits

__all__ = [
    "TemplateError", "render", "evaluate", "truthy", "syntax_error", "referenced_names",
    "this_view", "unwrap", "missing_paths", "value_problem",
]

_LENIENT = ("data", "result")      # NoETL accessors that fall back to the value itself
_CACHE_MAX = 10_000                # cleared wholesale when exceeded: simple and bounded
# A lone "{{ expr }}" (optionally with whitespace control). The regex only proposes the
# inner text; the parsed AST decides, because "{{ a }} {{ b }}" also matches it.
_LONE = re.compile(r"\A\s*\{\{-?(.*?)-?\}\}\s*\Z", re.DOTALL)


class TemplateError(Exception):
    """Any failure to render a template; str() names the template and the cause."""

    def __init__(self, template: Any, cause: BaseException | str):
        self.template = template
        self.cause = cause
        if isinstance(cause, _JinjaSyntaxError):     # incl. unknown filter/test names
            reason = f"syntax error: {cause.message}"
        elif isinstance(cause, _JinjaError):         # undefined / sandbox: reads well as is
            reason = str(cause)
        elif isinstance(cause, BaseException):       # Python errors (1/0, bad JSON) need the type
            reason = f"{type(cause).__name__}: {cause}"
        else:
            reason = cause
        message = f"{reason} in template {template!r}"
        if not message.isascii():   # the message travels in events: never a lone surrogate
            message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)


class _Undefined(StrictUndefined):
    """StrictUndefined whose message names the missing name (the DSL error must name it)."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        if self._undefined_hint:           # e.g. the sandbox's "access ... is unsafe"
            return self._undefined_hint
        name, obj = self._undefined_name, self._undefined_obj
        if not isinstance(name, str):               # xs[5] on a short list
            return f"no element {name!r} in {object_type_repr(obj)}"
        return f"undefined name {name!r}"           # a missing variable, key or attribute

    # repr() must fail too, or "{{ [x.nope] }}" inside text would print "[Undefined]".
    __repr__ = StrictUndefined._fail_with_undefined_error


class _Context(Context):
    # The caller's context is used as the parent *without copying* (shared=True), which
    # skips Jinja's usual merge of env globals into it, so fall back to them here.
    def resolve_or_missing(self, key: str) -> Any:
        rv = super().resolve_or_missing(key)
        if rv is missing:
            rv = self.environment.globals.get(key, missing)
        return rv


def _is_mapping(obj: Any) -> bool:
    return type(obj) is dict or isinstance(obj, Mapping)   # dict first: the common, cheap case


class _Env(ImmutableSandboxedEnvironment):
    """Immutable sandbox (templates cannot mutate engine state) with keys-win and lenient
    `.data`/`.result` lookups, bounded `**` and `*` (see `call_binop`), and bounded `%`-formatting,
    padding, replace and join (noetl_common.render_limits, docs/security.md)."""

    context_class = _Context
    # Intercepted operators are also never constant-folded at compile time, so `{{ 9 ** 9 ** 9 }}` cannot
    # hang the compiler either.
    intercepted_binops = frozenset(("**", "*")) | render_limits.INTERCEPTED

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        """`**` and `*` are the two operators whose result can be huge from a tiny template (`9 ** 9 ** 9`,
        `'x' * 10 ** 9`): one template would hold the fold (every execution) for minutes or exhaust memory.
        Refused before computing anything once the result would be beyond what a value may hold."""
        if operator == "**" and _int(left) and _int(right) and right > 0 and abs(left) > 1 \
                and right * math.log10(abs(left)) > MAX_DIGITS:
            raise _NotAValue(f"{left} ** {right} has more than {MAX_DIGITS} digits")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and _int(times) and len(seq) * times > MAX_REPEAT:
                    raise _NotAValue(f"a {type(seq).__name__} repeated {times} times is longer than "
                                     f"{MAX_REPEAT:,}")
        return render_limits.binop(operator, left, right)   # `%` widths, int products, list lengths

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        # double underscores like Jinja's own: a template's keyword argument cannot collide with them
        args = render_limits.check_call(__obj, args, kwargs)
        return ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        if _is_mapping(obj):
            try:
                return obj[attribute]           # keys win over dict methods (items, keys...)
            except (KeyError, TypeError):
                if attribute in _LENIENT:
                    return obj
        elif attribute in _LENIENT and (obj is None or isinstance(obj, (list, tuple))):
            return obj                          # null too: a control step's result (`{{ start.data }}`)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if _is_mapping(obj):
            try:
                return obj[argument]
            except (KeyError, TypeError):
                if type(argument) is str and argument in _LENIENT:
                    return obj
        elif type(argument) is str and argument in _LENIENT and (obj is None or isinstance(obj, (list, tuple))):
            return obj
        return super().getitem(obj, argument)


# --- values: what a template may produce (docs/decisions.md, "Templates") -------------------------

MAX_DIGITS = 4300        # an int's decimal digits: what Python's and pydantic's JSON readers take back
MAX_DEPTH = 100          # nesting of one rendered value (a snapshot nests it ~6 deeper; readers stop at 200)
MAX_REPEAT = 10_000_000  # the longest str/list/tuple `*` may build
_BIG = 10 ** MAX_DIGITS


class _NotAValue(Exception):
    """Raised while rendering: the template produced something that is not a JSON value."""


def _int(value: Any) -> bool:
    return type(value) is int


def value_problem(value: Any) -> tuple[str, str] | _Undefined | None:
    """None when `value` is a JSON value the engine can store and read back exactly; else (what is wrong,
    where in the value: "" for the value itself, else a path like `[0].k`), or the Undefined found in it.

    JSON values: None, bool, finite float, int of at most MAX_DIGITS digits, str (valid Unicode), list and
    tuple (an array; rendering hands it back as a list), dict with str keys; nested at most MAX_DEPTH
    deep. Everything else (a method, a function, a class, a set, bytes, NaN, an object) is not: stored, it
    would fail to encode, change on the way back (a set's order, NaN to null, an int key to a string), or
    stop the snapshot being read."""
    return _walk(value)[0]


def _walk(value: Any) -> tuple[tuple[str, str] | _Undefined | None, bool]:
    """(value_problem, whether the value holds a tuple)."""
    tuples = False
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        v, where, depth = stack.pop()
        t = type(v)
        if t is str:
            if not v.isascii() and not _utf8(v):
                return ("a string with a lone surrogate (not valid Unicode)", where), tuples
        elif t is int:
            if (v.bit_length() > 14_283 and abs(v) >= _BIG):
                return (f"an integer of more than {MAX_DIGITS} digits", where), tuples
        elif t is float:
            if not math.isfinite(v):
                return (f"{v!r}, not a JSON number", where), tuples
        elif v is None or t is bool:
            pass
        elif t is dict or t is list or t is tuple or isinstance(v, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                return (f"a value nested deeper than {MAX_DEPTH} levels", where), tuples
            if isinstance(v, dict):
                for key, item in v.items():
                    if type(key) is not str:
                        return (f"a key {key!r} ({type(key).__name__}): JSON object keys are strings", where), tuples
                    stack.append((item, f"{where}[{key!r}]", depth + 1))
            else:
                tuples = tuples or isinstance(v, tuple)
                stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(v))
        elif isinstance(v, _Undefined):
            return v, tuples
        elif isinstance(v, str):          # Markup and other str subclasses encode as strings
            stack.append((str(v), where, depth))
        elif isinstance(v, int) and not isinstance(v, bool):
            stack.append((int(v), where, depth))
        else:
            return (_describe(v), where), tuples
    return None, tuples


def _lists(value: Any) -> Any:
    """The value with every tuple made a list: what it becomes once written as JSON and read back, so a
    replay (or the other runtime) sees exactly the same value (`(1, 2) == [1, 2]` is false)."""
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _describe(v: Any) -> str:
    """What a non-value is, in the words a playbook author needs."""
    if isinstance(v, type):
        return f"a class ({v.__name__}), not a value"
    owner = getattr(v, "__self__", None)
    if callable(v) and owner is not None and not isinstance(owner, types.ModuleType):   # a bound method
        if isinstance(owner, Mapping):
            name = getattr(v, "__name__", "?")
            return f"a method of the mapping, not a value (the mapping has no key {name!r})"
        return f"a method of {type(owner).__name__}, not a value"
    if isinstance(v, (types.FunctionType, types.BuiltinFunctionType)):
        return "a function, not a value (call it: add `()`)"
    if callable(v):
        return f"a callable {type(v).__name__} object, not a value"
    if isinstance(v, (set, frozenset)):
        return "a set, not a JSON value (make it a list: `| list | sort`)"
    if isinstance(v, (bytes, bytearray)):
        return "bytes, not a JSON value (decode it to text)"
    if isinstance(v, Mapping):
        return f"a {type(v).__name__} mapping object, not a JSON value (take its keys one by one)"
    return f"a {type(v).__name__} object, not a JSON value"


def _not_a_value(subject: str, problem: tuple[str, str]) -> str:
    what, where = problem
    return f"{subject} is {what}" if not where else f"{subject} holds {what} at {where}"


def _tojson(value: Any, indent: int | None = None) -> str:
    # Exactly json.dumps: Jinja's builtin HTML-escapes <, >, &, ' which corrupts payloads.
    return json.dumps(value, indent=indent)


def _b64encode(value: str | bytes) -> str:
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
    return base64.b64encode(raw).decode("ascii")


def _b64decode(value: str | bytes) -> str:
    return base64.b64decode(value).decode("utf-8")


def _finalize(value: Any) -> Any:
    """Every `{{ }}` inside text must be a value too: str() of a method or a set would put a memory address
    or a hash order into the text, which no replay reproduces."""
    problem = value_problem(value)
    if problem is None:
        return value
    if isinstance(problem, _Undefined):
        problem._fail_with_undefined_error()
    raise _NotAValue(_not_a_value("an expression in the text", problem))


_ENV = _Env(undefined=_Undefined, autoescape=False, keep_trailing_newline=True, finalize=_finalize)
_ENV.filters.update(render_limits.bounded_filters(_ENV.filters))
_ENV.filters.update(tojson=_tojson, fromjson=json.loads, b64encode=_b64encode, b64decode=_b64decode)
# Non-deterministic helpers would break replaying the fold: drop them.
_ENV.filters.pop("random", None)
_ENV.globals.pop("lipsum", None)


class _ChainUndefined(_Undefined):
    """NoETL DSL v10 (V10-4.3): a lookup on an undefined value is undefined and a boolean test of one is
    false, so `{{ m.a.b | default('') }}` and `{{ s.x if s else t.x }}` work; printing, comparing or
    computing with one still fails naming it. Used when the context carries LENIENT (v10 contexts)."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name[:2] == "__":
            raise AttributeError(name)
        return self

    def __getitem__(self, _name: Any) -> Any:
        return self

    def __bool__(self) -> bool:
        return False


LENIENT = "__noetl_lenient__"   # a context key: render with _ChainUndefined (set by the v10 fold context)
_ENV_LENIENT = _Env(undefined=_ChainUndefined, autoescape=False, keep_trailing_newline=True, finalize=_finalize)
_ENV_LENIENT.filters.update(_ENV.filters)
_ENV_LENIENT.globals.pop("lipsum", None)


# --- compilation (cached per template string) --------------------------------------------

class _Compiled:
    __slots__ = ("template", "native", "pure_path", "expr")

    def __init__(self, template: Any, native: bool, pure_path: bool, expr: str = ""):
        self.template = template        # jinja Template (for an expression: its `result=` form)
        self.native = native            # lone {{ expr }}: return the value, not text
        self.pure_path = pure_path      # a.b['c'] only: result is context data, no deep scan needed
        self.expr = expr                # the lone expression's text, for error messages


_compiled: dict[str, _Compiled | TemplateError] = {}
_names: dict[str, frozenset[str]] = {}


def _is_pure_path(node: nodes.Node) -> bool:
    while True:
        if isinstance(node, nodes.Name):
            return True
        if isinstance(node, nodes.Getattr):
            node = node.node
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            node = node.node
        else:
            return False


def _compile(text: str, lenient: bool = False) -> _Compiled:
    key: Any = ("lenient", text) if lenient else text
    entry = _compiled.get(key)
    if entry is None:
        entry = _compile_uncached(text, _ENV_LENIENT if lenient else _ENV)
        if len(_compiled) >= _CACHE_MAX:
            _compiled.clear()
        _compiled[key] = entry
    if isinstance(entry, TemplateError):
        # A fresh exception per raise: re-raising the cached one would grow its traceback.
        raise TemplateError(entry.template, entry.cause)
    return entry


def _compile_uncached(text: str, env: Any = None) -> _Compiled | TemplateError:
    env = env or _ENV
    try:
        ast = env.parse(text)
        lone = _LONE.match(text)
        if lone and len(ast.body) == 1 and isinstance(ast.body[0], nodes.Output):
            exprs = [n for n in ast.body[0].nodes
                     if not (isinstance(n, nodes.TemplateData) and not n.data.strip())]
            if len(exprs) == 1 and not isinstance(exprs[0], nodes.TemplateData):
                # compile_expression gives a template that stores the value in vars['result'];
                # we run that template ourselves to avoid TemplateExpression's context copy.
                expr = env.compile_expression(lone.group(1), undefined_to_none=False)
                return _Compiled(expr._template, True, _is_pure_path(exprs[0]), lone.group(1).strip())
        return _Compiled(env.from_string(ast), False, False)
    except _JinjaSyntaxError as exc:    # includes unknown filters/tests (TemplateAssertionError)
        return TemplateError(text, exc)
    except RecursionError:              # Jinja's parser recurses per nesting level: `[[[[...` 90 deep
        return TemplateError(text, "syntax error: nested too deeply to parse")
    except Exception as exc:            # whatever else the compiler chokes on is this template's problem
        return TemplateError(text, exc)


# --- rendering ------------------------------------------------------------------------------

_TRUSTED = (dict, list)   # containers a pure path reads from the context: decoded JSON, values already


def _render_str(text: str, context: Mapping[str, Any]) -> Any:
    entry = _compile(text, LENIENT in context)
    template = entry.template
    try:
        ctx = template.new_context(context, shared=True)    # shared: no copy of the context
        if not entry.native:
            out = "".join(template.root_render_func(ctx))
            if not out.isascii() and not _utf8(out):
                raise _NotAValue("the text holds a lone surrogate (not valid Unicode)")
            return out
        for _ in template.root_render_func(ctx):
            pass
        rv = ctx.vars["result"]
        if isinstance(rv, _Undefined):
            rv._fail_with_undefined_error()
        if isinstance(rv, (Iterator, range, KeysView, ValuesView, ItemsView)):
            rv = list(rv)                 # e.g. "{{ xs | map('x') }}": a generator is no value
        elif isinstance(rv, str) and type(rv) is not str:
            rv = str(rv)                  # Markup from e.g. |escape: hand back a plain str
        # A pure path (a.b['c']) that ends on a dict or a list returns context data, which came from JSON:
        # only the value itself needs a look. Anything computed is checked all the way down.
        problem, tuples = (None, False) if entry.pure_path and type(rv) in _TRUSTED else _walk(rv)
        if tuples and problem is None:
            rv = _lists(rv)
        if problem is not None:
            if isinstance(problem, _Undefined):
                problem._fail_with_undefined_error()
            raise TemplateError(text, _not_a_value(f"`{entry.expr}`", problem))
        return rv
    except TemplateError:
        raise
    except _NotAValue as exc:
        raise TemplateError(text, str(exc)) from None
    except Exception as exc:              # any failure while rendering, e.g. 1/0, bad fromjson
        raise TemplateError(text, exc) from exc


def _has_markers(text: str) -> bool:
    return "{{" in text or "{%" in text


def render(value: Any, context: Mapping[str, Any]) -> Any:
    """Render templates inside value: dict values and list items recursively (keys are not
    rendered), a lone "{{ expr }}" to its native value, other templates to text."""
    if isinstance(value, str):
        return _render_str(value, context) if _has_markers(value) else value
    if isinstance(value, dict):
        return {k: render(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, context) for v in value]
    if isinstance(value, tuple):
        return tuple(render(v, context) for v in value)
    return value


def evaluate(template: str, context: Mapping[str, Any]) -> Any:
    """Render one string (a `when`, a where/order_by expression) to its value."""
    return render(template, context)


_TRUE = frozenset(("true", "yes", "1"))
_FALSE = frozenset(("false", "no", "0", "none", "null", ""))


def truthy(value: Any) -> bool:
    """DSL section 3: Python truthiness, but rendered text like 'false' or 'null' is false."""
    if isinstance(value, str):
        s = value.strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        return True
    return bool(value)


def syntax_error(text: str) -> str | None:
    """None if the templates in text compile, else a message naming the text (validator)."""
    if not isinstance(text, str) or not _has_markers(text):
        return None
    try:
        _compile(text)                    # also warms the cache for the run
    except TemplateError as exc:
        return str(exc)
    return None


def _names_of(text: str) -> frozenset[str]:
    names = _names.get(text)
    if names is None:
        try:
            names = frozenset(meta.find_undeclared_variables(_ENV.parse(text)))
        except _JinjaSyntaxError as exc:
            raise TemplateError(text, exc) from exc
        except RecursionError:
            raise TemplateError(text, "syntax error: nested too deeply to parse") from None
        if len(_names) >= _CACHE_MAX:
            _names.clear()
        _names[text] = names
    return names


def referenced_names(value: Any) -> set[str]:
    """Top-level context names used by every template inside value (to ship only those)."""
    out: set[str] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _has_markers(v):
                out |= _names_of(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return out


def this_view(result: Any, status: str = "COMPLETED", error: str | None = None) -> dict:
    """`this` (DSL section 5): the result's keys overlaid with data/result (= the result),
    status and error. The overlay wins over result keys of the same names."""
    view = dict(result) if isinstance(result, Mapping) else {}
    view.update(data=result, result=result, status=status, error=error)
    return view


def unwrap(value: Any) -> Any:
    """NoETL envelope {status, data, ...} -> data; anything else unchanged."""
    if isinstance(value, Mapping) and "status" in value and "data" in value:
        return value["data"]
    return value


def missing_paths(value: Any, paths: list[str]) -> list[str]:
    """The dotted paths (assert.expects/returns) that do not exist in value, in order.
    Strict: no lenient data/result fallback, so a contract means what it says."""
    out = []
    for path in paths:
        cur = value
        for seg in str(path).split("."):
            if isinstance(cur, Mapping) and seg in cur:
                cur = cur[seg]
            elif isinstance(cur, (list, tuple)) and seg.lstrip("-").isdigit() \
                    and -len(cur) <= int(seg) < len(cur):
                cur = cur[int(seg)]
            else:
                out.append(path)
                break
    return out
