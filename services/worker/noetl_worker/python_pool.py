"""The pool that runs `type: python` step code (DSL §2.1) away from the engine and its secrets.

Why processes: a thread cannot be stopped, so `timeout` could not "stop the code for real", and code in the
engine's process could read everything the engine holds. Each of the pool's `size` slots is a supervisor
process (`_python_slot.py`) that never runs step code: it forks *step processes* from itself, one per
execution (a call for another execution gets a fresh fork, about a millisecond, instead of a new
interpreter, about 30), each in its own session and working directory, with resource limits, as the step
user when the engine runs as root. docs/security.md ("How step code is isolated") has the whole picture;
this module is the engine's side:

- the slots start from a fresh interpreter (not multiprocessing: spawn/forkserver re-import the parent's
  `__main__`) with a scrubbed environment: an allow-list (PATH, locale, TZ, a few PYTHON*/SSL names and
  NOETL_STEP_ENV_ALLOW), never a NOETL_* variable, so neither the master key nor the database URL is
  there; no file descriptor of the engine is inherited;
- the engine process is made non-dumpable, so no process of its user can read its memory or its
  /proc/<pid>/environ;
- the reply pipe is non-blocking and watched with `loop.add_reader`, registered per call so one pool
  serves any event loop (tests open one loop per test).
"""
from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import pickle
import pwd
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noetl_runtime.settings import StepSettings, load_step_settings

from noetl_worker._python_child import frame, pack, unpack

log = logging.getLogger("noetl.worker.python")

_SLOT = str(Path(__file__).with_name("_python_slot.py"))
LIMITS = ("memory_mb", "cpu_seconds", "processes", "open_files", "file_size_mb")
# What a step sees of the engine's environment, besides NOETL_STEP_ENV_ALLOW: enough to find programs,
# speak the locale and verify TLS, nothing that configures the engine.
_ENV_ALLOWED = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "PYTHONPATH", "PYTHONHOME", "PYTHONIOENCODING",
                          "PYTHONUTF8", "SSL_CERT_FILE", "SSL_CERT_DIR"})
_SAFETY_MARGIN = 10.0   # the supervisor enforces the timeout; the engine gives up on it this much later


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
    limits = {name: getattr(settings, name) for name in LIMITS}
    if requested in (None, {}):
        return limits
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


class _Slot:
    """One supervisor process and the engine's ends of its two pipes."""

    def __init__(self, config: bytes, env: dict[str, str], cwd: str) -> None:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-P", _SLOT, str(req_r), str(rep_w)],
                pass_fds=(req_r, rep_w), stdin=subprocess.DEVNULL, stdout=_stdout_target(),
                env=env, cwd=cwd, close_fds=True)
        except BaseException:
            for fd in (req_r, req_w, rep_r, rep_w):
                os.close(fd)
            raise
        os.close(req_r)
        os.close(rep_w)
        os.set_blocking(rep_r, False)
        self.req_fd, self.rep_fd = req_w, rep_r
        self.buffer = bytearray()
        self.key: str | None = None     # the execution whose step process it holds
        self.send(config)

    def send(self, payload: bytes) -> None:
        view = memoryview(frame(payload))
        while view:
            view = view[os.write(self.req_fd, view):]

    def read_available(self) -> bytes | None:
        """Drain the reply pipe; a complete reply frame, b'' on EOF (the slot died), or None for 'not yet'."""
        while True:
            try:
                chunk = os.read(self.rep_fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                return b""
            self.buffer += chunk
        if len(self.buffer) >= 4:
            size = struct.unpack_from(">I", self.buffer)[0]
            if len(self.buffer) >= 4 + size:
                payload = bytes(self.buffer[4:4 + size])
                del self.buffer[:4 + size]
                return payload
        return None

    def kill(self) -> None:
        """SIGTERM first: the supervisor then kills its step processes (it is their subreaper)."""
        try:
            self.popen.send_signal(signal.SIGTERM)
            self.popen.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=5)
        except Exception:  # already gone: nothing left to stop
            pass
        for fd in (self.req_fd, self.rep_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def exit_description(self) -> str:
        try:
            code = self.popen.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        return f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"


def _stdout_target() -> int:
    """The supervisor's own messages (never step output, which it captures) go to our stderr: stdout may
    be the CLI's machine-readable JSON report and must stay clean."""
    try:
        os.fstat(2)
        return 2
    except OSError:
        return subprocess.DEVNULL


_TIMED_OUT = object()


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
        self._config = json.dumps({"uid": user[0] if user else None, "gid": user[1] if user else None,
                                   "base": self.base, "hard": hard, "log_max": self.settings.log_max_bytes,
                                   "preload": list(self.settings.preload_modules)}).encode()
        self._env = step_environment(os.environ, self.settings.env_allow_names)
        self._lock = threading.Lock()   # the pool may be shared by event loops in several threads
        self._idle: deque[_Slot] = deque()
        self._waiters: deque[asyncio.Future] = deque()
        self._all: set[_Slot] = set()   # idle and busy: close() stops them all
        self._closed = False
        for _ in range(self.size):
            self._idle.append(self._start())

    async def run(self, code: str, data: dict[str, Any], timeout: float | None = None, *,
                  execution: str | None = None, limits: Any = None,
                  context: Mapping[str, Any] | None = None) -> PythonOutcome:
        """`execution`: the step processes of one execution are reused for its later steps; None gets a
        process of its own. `limits`: the step's overrides. `context`: NoETL's read-only `context`."""
        try:
            granted = step_limits(self.settings, limits)
        except LimitError as exc:
            return PythonOutcome(False, error=str(exc))
        try:
            blob = pickle.dumps((code, data, dict(context) if context is not None else None),
                                protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            return PythonOutcome(False, error=f"step data cannot be sent to python: {type(exc).__name__}: {exc}")
        payload = pack((execution, timeout if timeout and timeout > 0 else None, granted), blob)
        slot = await self._acquire(execution)
        slot.key = execution
        try:
            slot.send(payload)
        except OSError:
            # The idle slot died (e.g. the OOM killer): replace it and try once on a fresh one.
            self._replace(slot)
            slot = await self._acquire(execution)
            try:
                slot.send(payload)
            except OSError as exc:
                self._replace(slot)
                return PythonOutcome(False, error=f"python worker process unavailable: {exc}")

        answer = await self._answer(slot, timeout)
        if answer is _TIMED_OUT:   # the supervisor did not enforce the timeout: stop it all
            self._replace(slot)
            return PythonOutcome(False, error=f"timed out after {format_seconds(timeout or 0)}s")
        if answer == b"":
            why = slot.exit_description()
            self._replace(slot)
            return PythonOutcome(False, error=f"python worker process {why} while running the step")
        self._release(slot)
        return _outcome(answer, timeout)

    async def _answer(self, slot: _Slot, timeout: float | None) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def readable() -> None:
            if fut.done():
                return
            payload = slot.read_available()
            if payload is not None:
                loop.remove_reader(slot.rep_fd)
                fut.set_result(payload)

        def expired() -> None:
            if not fut.done():
                loop.remove_reader(slot.rep_fd)
                fut.set_result(_TIMED_OUT)

        loop.add_reader(slot.rep_fd, readable)
        timer = loop.call_later(timeout + _SAFETY_MARGIN, expired) if timeout and timeout > 0 else None
        try:
            return await fut
        except BaseException:
            # Cancelled mid-call: the step still runs code nobody waits for; stop it for real.
            loop.remove_reader(slot.rep_fd)
            self._replace(slot)
            raise
        finally:
            if timer is not None:
                timer.cancel()

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
    async def _acquire(self, key: str | None) -> _Slot:
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

    def _release(self, slot: _Slot) -> None:
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

    def _hand(self, waiter: asyncio.Future, slot: _Slot) -> None:
        if waiter.done():         # cancelled between release and this callback
            self._release(slot)
        else:
            waiter.set_result(slot)

    def _start(self) -> _Slot:
        slot = _Slot(self._config, self._env, self.base)
        with self._lock:
            self._all.add(slot)
        return slot

    def _replace(self, slot: _Slot) -> None:
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


def _outcome(payload: bytes, timeout: float | None) -> PythonOutcome:
    try:
        (status, detail, log_text), body = unpack(payload)
        if status == "timeout":
            return PythonOutcome(False, error=f"timed out after {format_seconds(timeout or 0)}s", log=log_text)
        if status == "died":
            return PythonOutcome(False, error=f"python worker process {detail} while running the step", log=log_text)
        if status != "ok":
            return PythonOutcome(False, error=f"python step failed: {detail}", log=log_text)
        ok, result, error = json.loads(body)
    except Exception as exc:   # a step process may write anything on its pipe: never trust the shape
        return PythonOutcome(False, error=f"python step sent an answer that cannot be read: {type(exc).__name__}")
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
