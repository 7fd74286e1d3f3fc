"""What runs inside a step process: one python step at a time (DSL §2.1), and the pool's framing.

Imports only the standard library: the slot supervisor (`_python_slot.py`) loads this file by path and
forks step processes from itself, so neither needs the engine's package nor the parent's `__main__`.

Frames (every pipe of the pool): a 4-byte big-endian length, then the payload. `pack(header, body)` makes
a payload of a small header and an opaque body, so a supervisor can route a call without decoding (or
holding as objects) the step's data. A step process gets calls as `(workdir, limits)` + pickled
`(code, data, context)` and answers its CPU time so far + JSON `[ok, result, error]`: encoding the result
is the JSON-serialisability check the DSL demands, and the parent gets exactly what a JSON bus would carry.
Step output is not captured here: stdout and stderr are the step process's fd 1 and 2, a pipe the
supervisor reads (subprocesses and C code included) and bounds.
"""
from __future__ import annotations

import builtins
import inspect
import io
import json
import linecache
import marshal
import math
import os
import pickle
import resource
import struct
import sys
import traceback
from typing import Any

_CODE_CACHE_SIZE = 256        # distinct step codes kept compiled per step process
_FILENAME = "<step code>"
CUT_MARKER = "\n… [output cut here: {} bytes dropped] …\n"   # where bounded output lost its middle
RLIMITS = {                   # limit name -> (resource, unit in bytes or 1)
    "memory_mb": (resource.RLIMIT_AS, 1 << 20),
    "cpu_seconds": (resource.RLIMIT_CPU, 1),
    "processes": (resource.RLIMIT_NPROC, 1),
    "open_files": (resource.RLIMIT_NOFILE, 1),
    "file_size_mb": (resource.RLIMIT_FSIZE, 1 << 20),
}


# The prelude of NoETL DSL v10 script-style python (V10-3.1..3.5): its modules and helpers are globals of
# the step's namespace (the pipeline action adds the task's `libs` imports after it). It lives here, not in
# the pipeline action, so that the slot supervisor imports its modules once before it forks step processes
# and warms each new step process with it: a step process serves one execution, and importing uuid and
# datetime in each one cost ~10 ms of CPU per execution (more than 200 trivial tasks' own python).
SCRIPT_MODULES = ("os", "json", "uuid", "datetime")
SCRIPT_PRELUDE = '''
import os, json, uuid, datetime
def now_utc():
    return datetime.datetime.now(datetime.timezone.utc)
def format_iso8601(dt):
    return dt.isoformat()
def deep_merge(a, b):
    out = dict(a or {})
    for k, v in (b or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out
def get_val(d, path, default=None):
    cur = d
    for part in str(path).split('.'):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return default
    return cur
def make_serializable(x):
    return json.loads(json.dumps(x, default=str))
'''


# --- framing ----------------------------------------------------------------------------------------
def pack(header: Any, body: bytes = b"") -> bytes:
    """A payload of a small header and an opaque body. marshal is fast and is only ever read from the
    engine's own processes (engine -> supervisor -> step process, supervisor -> engine); what a step
    process sends back (`answer`) is a fixed binary header that needs no decoder."""
    head = marshal.dumps(header)
    return struct.pack(">I", len(head)) + head + body


def unpack(payload: bytes) -> tuple[Any, bytes]:
    size = struct.unpack_from(">I", payload)[0]
    return marshal.loads(payload[4:4 + size]), payload[4 + size:]


def answer(cpu_seconds: float, reply: bytes) -> bytes:
    return struct.pack(">d", cpu_seconds) + reply


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def read_frame(fd: int) -> bytes | None:
    """The next frame's payload from a blocking fd; None at end of file."""
    header = read_exact(fd, 4)
    if header is None:
        return None
    size = struct.unpack(">I", header)[0]
    return read_exact(fd, size) if size else b""


def read_exact(fd: int, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# --- the step process's loop ------------------------------------------------------------------------
class _BindError(Exception):
    """main()'s parameters cannot be bound from data: reported as-is, without a traceback."""


def step_main(call_fd: int, reply_fd: int, base_env: dict[str, str]) -> None:
    """Serve calls until the supervisor closes the pipe. Hard limits, user and session are already set.

    A step process serves one execution: what a step leaves behind (a variable in os.environ, a patched
    module) only the same execution's later steps can meet, so per call only what differs is set again."""
    out = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                           line_buffering=True)
    # A process the step forks must not hold the call and answer pipes: the engine reads the end of the
    # answer pipe as "the step process died", and later calls are not its business.
    os.register_at_fork(after_in_child=lambda: [os.close(fd) for fd in (call_fd, reply_fd)])
    codes: dict[str, Any] = {}
    plans: dict[Any, tuple] = {}
    entered: list[Any] = [None, None, None]   # the folder, limits and CPU soft limit the last call set
    while True:
        payload = read_frame(call_fd)
        if not payload:
            return
        (workdir, limits), blob = unpack(payload)
        _enter(workdir, base_env, limits, entered)
        sys.stdout = sys.stderr = out
        try:
            code, data, context, script = pickle.loads(blob)
            reply = run_one(code, data, context, codes, plans, script)
        except BaseException as exc:   # even unpickling is the step's own business (its data)
            reply = _reply(False, None, f"step data cannot be read: {_describe(exc)}")
        finally:
            out.flush()
        write_all(reply_fd, frame(answer(cpu_used(), reply.encode())))


def _enter(workdir: str, base_env: dict[str, str], limits: dict[str, int], entered: list[Any]) -> None:
    """The attempt's own folder (HOME and TMPDIR too), the scrubbed environment and the step's limits."""
    if workdir != entered[0]:
        os.environ.clear()
        os.environ.update(base_env)
        os.environ.update(HOME=workdir, TMPDIR=workdir, PWD=workdir)
        tempfile = sys.modules.get("tempfile")
        if tempfile is not None:
            tempfile.tempdir = workdir    # it caches the folder it picked first
        entered[0] = workdir
    os.chdir(workdir)
    used = cpu_used()
    for name, value in limits.items():
        which, unit = RLIMITS[name]
        soft = value * unit
        if name == "cpu_seconds":
            # CPU time counts over the process's life: the step's budget starts now. Renewed only when
            # less than 90% of it is left (a trivial step need not pay two system calls for it).
            soft += math.ceil(used)
            if entered[2] is not None and entered[2] - used >= 0.9 * value and entered[1].get(name) == value:
                continue
            entered[2] = soft
        elif entered[1] is not None and entered[1].get(name) == value:
            continue
        hard = resource.getrlimit(which)[1]
        try:
            resource.setrlimit(which, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
        except (ValueError, OSError):
            pass   # an earlier step of this execution lowered the hard limit: that one holds
    entered[1] = limits


def cpu_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_one(code: str, data: dict, context: dict | None, codes: dict, plans: dict, script: str | None = None
            ) -> str:
    """The JSON reply `[ok, result, error]` for one call; output goes to sys.stdout/sys.stderr."""
    try:
        if script is not None:
            value = _call_script(code, script, data, context, codes, plans)
        else:
            value = _call(code, data, context, codes, plans)
    except _BindError as exc:
        return _reply(False, None, str(exc))
    except BaseException as exc:  # SystemExit/KeyboardInterrupt from user code are errors too
        # Registered only now (one name, many codes): the traceback then shows the user's lines.
        shown = code
        if script is not None:   # the lines that ran: a wrapped script's (a top-level `return`)
            try:
                shown = _script_source(code)
            except SyntaxError:
                pass
        linecache.cache[_FILENAME] = (len(shown), None, shown.splitlines(True), _FILENAME)
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next  # the user's frames only: ours are noise in a step log
        try:
            traceback.print_exception(type(exc), exc, tb)
        except BaseException:   # a hostile __str__ or a closed stderr must not lose the error itself
            pass
        return _reply(False, None, _describe(exc))
    try:
        return json.dumps([True, value, None], allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        why = first_unserialisable(value, "result") or str(exc)
        return _reply(False, None, f"result is not JSON-serialisable: {why}")


def _reply(ok: bool, value: Any, error: str | None) -> str:
    return json.dumps([ok, value, error])


def _call(code: str, data: dict, context: dict | None, codes: dict, plans: dict) -> Any:
    compiled = codes.get(code)
    if compiled is None:
        compiled = compile(code, _FILENAME, "exec")
        if len(codes) >= _CODE_CACHE_SIZE:
            codes.pop(next(iter(codes)))
        codes[code] = compiled
    # A fresh namespace per call: module-level state never leaks from one step (or iteration) to the next,
    # and imports and helpers defined at module level are globals of main (one namespace).
    namespace: dict[str, Any] = {"__name__": "__noetl_step__", "__builtins__": builtins}
    frozen = freeze(context) if context is not None else None
    if frozen is not None:
        namespace["context"] = frozen       # NoETL's read-only `context` global (issue 11)
    exec(compiled, namespace)
    main = namespace.get("main")
    if not callable(main):
        raise _BindError("code does not define a callable main()")
    plan = _plan_of(main, plans)
    if frozen is not None and "context" not in data:
        data = {**data, "context": frozen}  # a `context` parameter, or **kwargs, receives it too
    args, kwargs = _bind(plan, data)
    return main(*args, **kwargs)


def _script_source(code: str) -> str:
    """V10-3.1: code with a top-level `return` runs as the body of a function whose value is the result."""
    try:
        compile(code, _FILENAME, "exec")
        return code
    except SyntaxError as exc:
        if "outside function" not in str(exc.msg):
            raise
    body = "".join("    " + line if line.strip() else line for line in code.splitlines(True))
    return f"def __noetl_body__():\n{body}\n    return None\nresult = __noetl_body__()\n"


def _call_script(code: str, extra: str, data: dict, context: dict | None, codes: dict, plans: dict) -> Any:
    """NoETL DSL v10 python (V10-3.1..3.5): the inputs, `input_data`, `context`, the modules and helpers of
    SCRIPT_PRELUDE and `extra` (the task's `libs` imports) are globals of one namespace; a callable `main` is
    called (bound by name), else the value of `result` is the task result (null when the code never assigns
    it). The prelude lives here, so a call carries only its `extra` lines."""
    body = _script_compiled(code, codes)
    namespace: dict[str, Any] = {"__name__": "__noetl_step__", "__builtins__": builtins}
    prelude = codes.get(("prelude", extra))
    if prelude is None:
        prelude = _compiled(SCRIPT_PRELUDE + extra, codes, ("prelude", extra))
    exec(prelude, namespace)
    frozen = freeze(context) if context is not None else None
    namespace["context"] = frozen
    namespace["input_data"] = data
    namespace["data"] = data.get("data")
    for key, value in data.items():
        if isinstance(key, str) and key.isidentifier():
            namespace[key] = value
    exec(body, namespace)
    main = namespace.get("main")
    if callable(main) and "result" not in namespace:
        bound = {**(dict(context) if context else {}), **data}
        if frozen is not None:
            bound["context"] = frozen
        args, kwargs = _bind(_plan_of(main, plans), bound)
        value = main(*args, **kwargs)
        if inspect.iscoroutine(value):
            import asyncio
            value = asyncio.run(value)
        return value
    return namespace.get("result")


def _compiled(code: str, codes: dict, key: Any = None) -> Any:
    """`code` compiled, kept under `key` (default: the code itself) among the last _CODE_CACHE_SIZE."""
    key = code if key is None else key
    compiled = codes.get(key)
    if compiled is None:
        compiled = compile(code, _FILENAME, "exec")
        if len(codes) >= _CODE_CACHE_SIZE:
            codes.pop(next(iter(codes)))
        codes[key] = compiled
    return compiled


def _script_compiled(code: str, codes: dict) -> Any:
    """Script-style code, compiled once: finding out whether it needs wrapping (a top-level `return`) costs a
    compile, which was most of a trivial task's time when it ran on every call. A SyntaxError is raised on
    every call (nothing is kept), naming the user's lines as before."""
    compiled = codes.get(("script", code))
    if compiled is None:
        source = _script_source(code)
        compiled = _compiled(source, codes, ("script", code))
    return compiled


def _plan_of(main: Any, plans: dict) -> tuple:
    """main's plan, kept per code object among the last _CODE_CACHE_SIZE."""
    fcode = getattr(main, "__code__", None)
    plan = plans.get(fcode) if fcode is not None else None
    if plan is None:
        plan = _plan(main)
        if fcode is not None:
            if len(plans) >= _CODE_CACHE_SIZE:
                plans.pop(next(iter(plans)))
            plans[fcode] = plan
    return plan


def _plan(main: Any) -> tuple:
    """(positional-only names, named params, has **kwargs): inspect.signature is slow, so it runs once."""
    try:
        sig = inspect.signature(main)
    except (TypeError, ValueError):
        return (), (), True
    positional: list[tuple[str, bool]] = []
    named: list[tuple[str, bool]] = []
    var_kw = False
    for p in sig.parameters.values():
        required = p.default is inspect.Parameter.empty
        if p.kind is p.POSITIONAL_ONLY:
            positional.append((p.name, required))
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            named.append((p.name, required))
        elif p.kind is p.VAR_KEYWORD:
            var_kw = True
    return tuple(positional), tuple(named), var_kw


def _bind(plan: tuple, data: dict) -> tuple[list, dict]:
    positional, named, var_kw = plan
    args: list = []
    kwargs: dict = {}
    missing: list[str] = []
    for name, required in positional:
        if name in data:
            args.append(data[name])
        elif name == "input_data":
            args.append(data)
        elif required:
            missing.append(name)
        else:
            break  # later positional-only parameters cannot be passed once one is skipped
    for name, required in named:
        if name in data:
            kwargs[name] = data[name]
        elif name == "input_data":
            kwargs[name] = data
        elif required:
            missing.append(name)
    if missing:
        names = ", ".join(repr(m) for m in missing)
        keys = ", ".join(sorted(map(str, data))) or "none"
        raise _BindError(f"main() is missing required argument(s) {names}: not in the step's data "
                         f"(data keys: {keys})")
    if var_kw:
        bound = {n for n, _ in positional} | set(kwargs)
        for key, value in data.items():
            if key not in bound and isinstance(key, str):
                kwargs[key] = value
    return args, kwargs


def _describe(exc: BaseException) -> str:
    try:
        message = str(exc)
    except BaseException:
        message = ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# --- NoETL's read-only `context` ----------------------------------------------------------------------
def _read_only(*_: Any, **__: Any) -> Any:
    raise TypeError("NoETL's context is read-only (copy it first: dict(context))")


class ReadOnlyDict(dict):
    """A dict that refuses changes, with the DSL's lenient `data`/`result` lookups (§5): a key that is
    missing answers with the mapping itself, so `context.get("step", {}).get("data")` reads a result."""

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only

    def __missing__(self, key: Any) -> Any:
        if key in ("data", "result"):
            return self
        raise KeyError(key)

    def get(self, key: Any, default: Any = None) -> Any:
        if key in self:
            return dict.__getitem__(self, key)
        return self if key in ("data", "result") else default


class ReadOnlyList(list):
    __setitem__ = __delitem__ = append = extend = insert = pop = remove = clear = sort = reverse = _read_only
    __iadd__ = __imul__ = _read_only


_CONTAINERS = (dict, list, tuple)


def freeze(value: Any, memo: dict[int, Any] | None = None) -> Any:
    """A read-only copy. A container met twice (v10's `ctx`, `workload` and `vars` are one map) is copied
    once and stays one object, as it was. Scalars are copied by dict's own copy (C), then the containers
    among the values are replaced by frozen copies: most of a context is scalars."""
    if isinstance(value, dict):
        memo = {} if memo is None else memo
        frozen = memo.get(id(value))
        if frozen is None:
            frozen = memo[id(value)] = ReadOnlyDict(value)
            for k, v in value.items():
                if isinstance(v, _CONTAINERS):
                    dict.__setitem__(frozen, k, freeze(v, memo))
        return frozen
    if isinstance(value, (list, tuple)):
        memo = {} if memo is None else memo
        frozen = memo.get(id(value))
        if frozen is None:
            frozen = memo[id(value)] = ReadOnlyList(
                freeze(v, memo) if isinstance(v, _CONTAINERS) else v for v in value)
        return frozen
    return value


def first_unserialisable(value: Any, path: str, depth: int = 0) -> str:
    """Name the first value json cannot carry, with its path, so the user knows what to convert."""
    if depth > 200:
        return f"nesting too deep at {path}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"float {value} at {path}"
    if value is None or isinstance(value, (str, int, float, bool)):
        return ""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                return f"{type(k).__name__} key at {path}"
            found = first_unserialisable(v, f"{path}[{k!r}]", depth + 1)
            if found:
                return found
        return ""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = first_unserialisable(v, f"{path}[{i}]", depth + 1)
            if found:
                return found
        return ""
    return f"{type(value).__name__} at {path}" if path != "result" else type(value).__name__
