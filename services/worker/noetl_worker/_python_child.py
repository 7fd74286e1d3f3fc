"""The loop that runs inside each python pool process (DSL §2.1).

Started as a script (`python _python_child.py REQ_FD REPLY_FD`), importing only the standard library: it
needs neither the engine's package nor the parent's `__main__` (multiprocessing's spawn/forkserver would
re-import that, which breaks any embedding script without a `__main__` guard), and a replacement for a
killed worker boots as fast as the interpreter does.

Protocol on two private pipes (not stdin/stdout: user code and its subprocesses may write to fd 1):
frames of a 4-byte big-endian length + payload. Requests are pickled `(code, data)`; an empty frame
stops the child. Replies are JSON `[ok, result, error, log]`: encoding the result is the
JSON-serialisability check the DSL demands, and the parent gets exactly what a JSON bus would carry.
"""
from __future__ import annotations

import builtins
import inspect
import io
import json
import linecache
import math
import os
import pickle
import signal
import struct
import sys
import traceback
from typing import Any

_CODE_CACHE_SIZE = 256        # distinct step codes kept compiled per process
_LOG_LIMIT = 256 * 1024       # a runaway print loop must not blow up the result message
_FILENAME = "<step code>"


class _BindError(Exception):
    """main()'s parameters cannot be bound from data: reported as-is, without a traceback."""


def child_main(req_fd: int, reply_fd: int) -> None:
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    codes: dict[str, Any] = {}
    plans: dict[Any, tuple] = {}
    while True:
        header = _read_exact(req_fd, 4)
        if header is None:
            return
        size = struct.unpack(">I", header)[0]
        payload = _read_exact(req_fd, size) if size else None
        if payload is None:
            return
        code, data = pickle.loads(payload)
        reply = run_one(code, data, codes, plans).encode()
        _write_all(reply_fd, struct.pack(">I", len(reply)) + reply)


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def run_one(code: str, data: dict, codes: dict, plans: dict) -> str:
    """The JSON reply `[ok, result, error, log]` for one call."""
    out = io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = out
    try:
        try:
            value = _call(code, data, codes, plans)
        except _BindError as exc:
            return _reply(False, None, str(exc), _log(out))
        except BaseException as exc:  # SystemExit/KeyboardInterrupt from user code are errors too
            # Registered only now (one name, many codes): the traceback then shows the user's lines.
            linecache.cache[_FILENAME] = (len(code), None, code.splitlines(True), _FILENAME)
            tb = exc.__traceback__
            while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
                tb = tb.tb_next  # the user's frames only: ours are noise in a step log
            traceback.print_exception(type(exc), exc, tb)
            return _reply(False, None, _describe(exc), _log(out))
    finally:
        sys.stdout, sys.stderr = saved
    log = _log(out)
    try:
        return json.dumps([True, value, None, log], allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        why = first_unserialisable(value, "result") or str(exc)
        return _reply(False, None, f"result is not JSON-serialisable: {why}", log)


def _reply(ok: bool, value: Any, error: str | None, log: str) -> str:
    return json.dumps([ok, value, error, log])


def _call(code: str, data: dict, codes: dict, plans: dict) -> Any:
    compiled = codes.get(code)
    if compiled is None:
        compiled = compile(code, _FILENAME, "exec")
        if len(codes) >= _CODE_CACHE_SIZE:
            codes.pop(next(iter(codes)))
        codes[code] = compiled
    # A fresh namespace per call: module-level state never leaks from one step (or iteration) to the next,
    # and imports and helpers defined at module level are globals of main (one namespace).
    namespace = {"__name__": "__noetl_step__", "__builtins__": builtins}
    exec(compiled, namespace)
    main = namespace.get("main")
    if not callable(main):
        raise _BindError("code does not define a callable main()")
    fcode = getattr(main, "__code__", None)
    plan = plans.get(fcode) if fcode is not None else None
    if plan is None:
        plan = _plan(main)
        if fcode is not None:
            if len(plans) >= _CODE_CACHE_SIZE:
                plans.pop(next(iter(plans)))
            plans[fcode] = plan
    args, kwargs = _bind(plan, data)
    return main(*args, **kwargs)


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
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _log(out: io.StringIO) -> str:
    text = out.getvalue()
    if len(text) > _LOG_LIMIT:
        half = _LOG_LIMIT // 2
        text = f"{text[:half]}\n… [{len(text) - _LOG_LIMIT} characters of log dropped] …\n{text[-half:]}"
    return text


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


if __name__ == "__main__":
    # Started with -P, so this script's folder (the engine's modules) cannot shadow the user's imports.
    try:
        child_main(int(sys.argv[1]), int(sys.argv[2]))
    except (BrokenPipeError, ConnectionResetError):
        pass   # the parent is gone (killed): nobody is waiting for this answer
