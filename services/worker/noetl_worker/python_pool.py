"""The pool that runs `type: python` step code (DSL §2.1) away from the engine and its secrets.

Why processes: a thread cannot be stopped, so `timeout` could not "stop the code for real", and code in the
engine's process could read everything the engine holds. Each of the pool's `size` slots is a supervisor
process (`_python_slot.py`, driven through `python_slots.Slot`) that never runs step code: it forks *step
processes* from itself, one per execution (a call for another execution gets a fresh, pre-warmed fork
instead of a new interpreter), each in its own session and working folder, with resource limits, as the
step user when the engine runs as root. A call then goes straight to the step process and back.
docs/security.md ("How step code is isolated") has the whole picture; this module is the engine's side:

- the supervisors start from a fresh interpreter (not multiprocessing: spawn/forkserver re-import the
  parent's `__main__`) with a scrubbed environment: an allow-list (PATH, locale, TZ, a few PYTHON*/SSL names
  and NOETL_STEP_ENV_ALLOW), never a NOETL_* variable, so neither the master key nor the database URL is
  there; no file descriptor of the engine is inherited;
- the engine process is made non-dumpable, so no process of its user can read its memory or its
  /proc/<pid>/environ;
- after each call the step process is looked at: if it left processes behind, it is ended with them
  before the answer is given; a timeout, a crash or a cancelled call end it too;
- the pipes are non-blocking and watched with `loop.add_reader`, registered per call so one pool serves any
  event loop (tests open one loop per test).
"""
from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import logging
import marshal
import os
import pickle
import pwd
import struct
import subprocess
import tempfile
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noetl_runtime.settings import StepSettings, load_step_settings

from noetl_worker._python_child import frame, pack
from noetl_worker.python_slots import Capture, Slot, SlotGone, Step, stamp

log = logging.getLogger("noetl.worker.python")

_SLOT = str(Path(__file__).with_name("_python_slot.py"))
LIMITS = ("memory_mb", "cpu_seconds", "processes", "open_files", "file_size_mb")
# What a step sees of the engine's environment, besides NOETL_STEP_ENV_ALLOW: enough to find programs,
# speak the locale and verify TLS, nothing that configures the engine.
_ENV_ALLOWED = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "PYTHONPATH", "PYTHONHOME", "PYTHONIOENCODING",
                          "PYTHONUTF8", "SSL_CERT_FILE", "SSL_CERT_DIR"})


@dataclass(frozen=True)
class PythonOutcome:
    ok: bool
    result: Any = None
    error: str | None = None
    log: str = ""


class LimitError(ValueError):
    """A step's `limits` cannot be granted; the message says which and why."""


def format_seconds(seconds: float) -> str:
    """1 -> '1', 0.5 -> '0.5': the DSL's error text is `timed out after Ns`."""
    return f"{seconds:g}"


def step_limits(settings: StepSettings, requested: Any) -> dict[str, int]:
    """The limits of one call: the settings' defaults, overridden by the step's `limits` within the
    maximums. Unknown names, non-integers and values above a maximum are refused, never clamped."""
    if requested is None or requested == {}:
        return _defaults(settings)
    limits = dict(_defaults(settings))
    if not isinstance(requested, Mapping):
        raise LimitError(f"limits must be a mapping of {', '.join(LIMITS)}, got {type(requested).__name__}")
    for name, value in requested.items():
        if name not in limits:
            raise LimitError(f"unknown limit {name!r} (known: {', '.join(LIMITS)})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LimitError(f"limits.{name} must be a positive whole number, got {value!r}")
        ceiling = getattr(settings, f"max_{name}")
        if value > ceiling:
            raise LimitError(f"limits.{name} = {value} is above the maximum {ceiling} "
                             f"(NOETL_STEP_MAX_{name.upper()})")
        limits[name] = value
    return limits


@functools.lru_cache(maxsize=16)
def _defaults(settings: StepSettings) -> dict[str, int]:
    return {name: getattr(settings, name) for name in LIMITS}


def step_environment(environ: Mapping[str, str], extra: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment step code sees: an allow-list, never a NOETL_* variable."""
    allowed = _ENV_ALLOWED | set(extra)
    return {k: v for k, v in environ.items()
            if (k in allowed or k.startswith("LC_")) and not k.upper().startswith("NOETL_")}


def step_user(name: str) -> tuple[int, int] | None:
    """(uid, gid) to run steps as when the engine runs as root; None when it does not (steps then run as
    the engine's own user, and docs/security.md says what that leaves open)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(f"the engine runs as root and the step user {name!r} (NOETL_STEP_USER) does not exist: "
                           f"create it (useradd --system --no-create-home {name}) or name another "
                           f"unprivileged user") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise RuntimeError(f"NOETL_STEP_USER {name!r} is root or in group root: python steps must not run "
                           f"with the engine's privileges")
    return entry.pw_uid, entry.pw_gid


def make_non_dumpable() -> None:
    """prctl(PR_SET_DUMPABLE, 0): other processes of our user (step code among them) cannot read this
    process's memory or /proc/<pid>/environ, nor attach a debugger; no core dump holds its secrets."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)
    except (OSError, AttributeError):   # not Linux: nothing equivalent to do
        pass


def _stdout_target() -> int:
    """The supervisors' own messages (never step output, which the engine captures) go to our stderr:
    stdout may be the CLI's machine-readable JSON report and must stay clean."""
    try:
        os.fstat(2)
        return 2
    except OSError:
        return subprocess.DEVNULL


class PythonPool:
    """`await pool.run(code, data, timeout, execution=..., limits=..., context=...)` runs `main` of `code`
    in a step process of one of `size` slots."""

    def __init__(self, size: int | None = None, settings: StepSettings | None = None) -> None:
        self.settings = settings if settings is not None else load_step_settings()
        self.size = max(1, size or os.cpu_count() or 1)
        make_non_dumpable()
        user = step_user(self.settings.user)
        # A private folder per pool for the attempts' working directories: 0711, so a step can enter its
        # own (named at random) but cannot list the others.
        self.base = tempfile.mkdtemp(prefix="noetl-steps-", dir=self.settings.work_dir)
        os.chmod(self.base, 0o711)
        hard = {name: getattr(self.settings, f"max_{name}") for name in LIMITS}
        self._hard_cpu = hard["cpu_seconds"]
        self._config = marshal.dumps({"uid": user[0] if user else None, "gid": user[1] if user else None,
                                      "base": self.base, "hard": hard,
                                      "preload": list(self.settings.preload_modules)})
        self._env = step_environment(os.environ, self.settings.env_allow_names)
        self._lock = threading.Lock()   # the pool may be shared by event loops in several threads
        self._idle: deque[Slot] = deque()
        self._waiters: deque[asyncio.Future] = deque()
        self._all: set[Slot] = set()   # idle and busy: close() stops them all
        self._closed = False
        for _ in range(self.size):
            self._idle.append(self._start())

    async def run(self, code: str, data: dict[str, Any], timeout: float | None = None, *,
                  execution: str | None = None, limits: Any = None,
                  context: Mapping[str, Any] | None = None, script: str | None = None) -> PythonOutcome:
        """`execution`: the step processes of one execution are reused for its later steps; None gets a
        process of its own. `limits`: the step's overrides. `context`: NoETL's read-only `context`.
        `script`: run NoETL DSL v10 style (the code's `result`, or its `main`), after the step process's own
        SCRIPT_PRELUDE and these extra lines (a task's `libs` imports; "" for none)."""
        try:
            granted = step_limits(self.settings, limits)
        except LimitError as exc:
            return PythonOutcome(False, error=str(exc))
        try:
            blob = pickle.dumps((code, data, dict(context) if context is not None else None, script),
                                protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            return PythonOutcome(False, error=f"step data cannot be sent to python: {type(exc).__name__}: {exc}")
        timeout = timeout if timeout and timeout > 0 else None
        slot = await self._acquire(execution)
        try:
            outcome = await self._call(slot, execution, granted, blob, timeout)
        except SlotGone as exc:
            self._replace(slot)
            return PythonOutcome(False, error=str(exc))
        except BaseException:
            # Cancelled mid-call (or a bug): the step may still run code nobody waits for; stop it for real.
            self._replace(slot)
            raise
        self._release(slot)
        return outcome

    async def _call(self, slot: Slot, execution: str | None, limits: dict[str, int], blob: bytes,
                    timeout: float | None) -> PythonOutcome:
        step = slot.step
        if (step is None or step.key != execution or execution is None
                or step.cpu + limits["cpu_seconds"] + 1 >= self._hard_cpu):
            step = await slot.bind(execution)       # a fresh step process, for this execution only
        elif step.stale:
            await slot.refresh_workdir(step)
        status, body, log_text = await self._exchange(step, frame(pack((step.workdir, limits), blob)), timeout)
        if status == "ok":
            if execution is None or step.children():
                await slot.end(step)                 # it left processes: they end with the step
            elif stamp(step.workdir) != step.stamp:
                step.stale = True
            return _outcome(step, body, log_text)
        how = await slot.end(step)                   # kills what is left, says how a dead one ended
        if status == "timeout":
            return PythonOutcome(False, error=f"timed out after {format_seconds(timeout or 0)}s", log=log_text)
        if status == "died":
            return PythonOutcome(False, error=f"python worker process {how} while running the step", log=log_text)
        return PythonOutcome(False, error=f"python step failed: {body.decode()}", log=log_text)

    async def _exchange(self, step: Step, request: bytes, timeout: float | None) -> tuple[str, bytes, str]:
        """Send one call to the step process and collect its answer and output."""
        loop = asyncio.get_running_loop()
        capture = Capture(self.settings.log_max_bytes)
        done = step.begin(loop, capture)
        pending = memoryview(request)

        def writable() -> None:
            nonlocal pending
            try:
                pending = pending[os.write(step.call_w, pending):]
            except BlockingIOError:
                return
            except OSError:
                pending = pending[:0]    # it is gone: the end of its answer pipe says so
            if not pending:
                loop.remove_writer(step.call_w)

        writable()
        waiting_to_write = bool(pending)     # most calls fit in the pipe at once
        if waiting_to_write:
            loop.add_writer(step.call_w, writable)
        timer = loop.call_later(timeout, _expire, done) if timeout is not None else None
        try:
            status, body = await done
        finally:
            step.finish()
            if waiting_to_write:
                loop.remove_writer(step.call_w)
            if timer is not None:
                timer.cancel()
        step.drain(capture)
        return status, body, capture.text()

    def close(self) -> None:
        """Stop every slot (a busy call then returns an error outcome) and fail waiting callers."""
        with self._lock:
            self._closed = True
            slots, self._all, self._idle = list(self._all), set(), deque()
            waiters, self._waiters = list(self._waiters), deque()
        for slot in slots:
            slot.kill()
        for w in waiters:
            _call_in_loop(w, _fail_waiter)
        _remove_tree(self.base)

    def __enter__(self) -> PythonPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- bookkeeping -------------------------------------------------------------------------------
    async def _acquire(self, key: str | None) -> Slot:
        with self._lock:
            if self._closed:
                raise RuntimeError("python pool is closed")
            if self._idle:
                # The slot already holding this execution's step process saves a fork.
                match = next((s for s in self._idle if key is not None and s.key == key), None)
                if match is not None:
                    self._idle.remove(match)
                    return match
                return self._idle.popleft()
            grow = len(self._all) < self.size   # a replacement failed to start earlier: try again now
        if grow:
            try:
                return self._start()
            except Exception:
                pass
        with self._lock:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release(fut.result())  # handed a slot just as we were cancelled: pass it on
            raise

    def _release(self, slot: Slot) -> None:
        with self._lock:
            closed = self._closed
            if not closed:
                while self._waiters:
                    waiter = self._waiters.popleft()
                    if not waiter.done():
                        _call_in_loop(waiter, lambda w: self._hand(w, slot))
                        return
                self._idle.append(slot)
                return
            self._all.discard(slot)
        slot.kill()

    def _hand(self, waiter: asyncio.Future, slot: Slot) -> None:
        if waiter.done():         # cancelled between release and this callback
            self._release(slot)
        else:
            waiter.set_result(slot)

    def _start(self) -> Slot:
        slot = Slot(self._config, self._env, self.base, _stdout_target())
        with self._lock:
            self._all.add(slot)
        return slot

    def _replace(self, slot: Slot) -> None:
        with self._lock:
            self._all.discard(slot)
        slot.kill()
        if self._closed:
            return
        try:
            fresh = self._start()
        except Exception:
            return  # cannot start one right now: _acquire grows the pool back when it next needs one
        self._release(fresh)


def _expire(done: asyncio.Future) -> None:
    if not done.done():
        done.set_result(("timeout", b""))


def _outcome(step: Step, answer: bytes, log_text: str) -> PythonOutcome:
    try:
        step.cpu = struct.unpack_from(">d", answer)[0]
        ok, result, error = json.loads(answer[8:])
    except Exception as exc:   # a step process may write anything on its pipe: never trust the shape
        return PythonOutcome(False, error=f"python step sent an answer that cannot be read: {type(exc).__name__}",
                             log=log_text)
    return PythonOutcome(bool(ok), result, error, log_text)


def _remove_tree(path: str) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def _call_in_loop(fut: asyncio.Future, fn: Any) -> None:
    """Run fn(fut) in fut's loop: directly when we are in it, thread-safely otherwise."""
    loop = fut.get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fn(fut)
    elif not loop.is_closed():
        loop.call_soon_threadsafe(fn, fut)


def _fail_waiter(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(RuntimeError("python pool is closed"))
