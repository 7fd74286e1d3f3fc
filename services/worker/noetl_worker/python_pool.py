"""A pool of long-lived worker processes that run `type: python` step code (DSL §2.1).

Why processes: a thread cannot be stopped, so `timeout` could not "stop the code for real"; a process can
be killed, and a replacement started. Why long-lived: the engine targets ≥ 1,000 trivial python steps per
second, so a call must cost a pipe round trip, not a process start.

Why a plain subprocess rather than multiprocessing: spawn/forkserver children re-import the parent's
`__main__`, which recursively starts pools in any embedding script without a `__main__` guard, and pickle
the target through the engine's package. A fresh interpreter running `_python_child.py` (the spawn model,
done by hand) needs neither, and its framing is ours, so the parent reads answers without ever blocking:
the reply pipe is non-blocking and watched with `loop.add_reader`, registered per call so one pool serves
any event loop (tests open one loop per test).
"""
from __future__ import annotations

import asyncio
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CHILD = str(Path(__file__).with_name("_python_child.py"))


@dataclass(frozen=True)
class PythonOutcome:
    ok: bool
    result: Any = None
    error: str | None = None
    log: str = ""


def format_seconds(seconds: float) -> str:
    """1 -> '1', 0.5 -> '0.5': the DSL's error text is `timed out after Ns`."""
    return f"{seconds:g}"


class _Proc:
    """One child interpreter and the parent's ends of its two pipes."""

    def __init__(self) -> None:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-P", _CHILD, str(req_r), str(rep_w)],
                pass_fds=(req_r, rep_w), stdin=subprocess.DEVNULL, stdout=_stdout_target(),
                env=_child_env(), close_fds=True)
        except BaseException:
            for fd in (req_r, req_w, rep_r, rep_w):
                os.close(fd)
            raise
        os.close(req_r)
        os.close(rep_w)
        os.set_blocking(rep_r, False)
        self.req_fd, self.rep_fd = req_w, rep_r
        self.buffer = bytearray()

    def send(self, payload: bytes) -> None:
        view = memoryview(struct.pack(">I", len(payload)) + payload)
        while view:
            view = view[os.write(self.req_fd, view):]

    def read_available(self) -> bytes | None:
        """Drain the reply pipe; a complete reply frame, b'' on EOF (the child died), or None for 'not yet'."""
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
                frame = bytes(self.buffer[4:4 + size])
                del self.buffer[:4 + size]
                return frame
        return None

    def kill(self) -> None:
        try:
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
    """Output that bypasses sys.stdout (C extensions, os.system) goes to our stderr: stdout may be the
    CLI's machine-readable JSON report and must stay clean."""
    try:
        os.fstat(2)
        return 2
    except OSError:
        return subprocess.DEVNULL


def _child_env() -> dict[str, str]:
    """The worker's environment minus NOETL_SECRET_*: step code gets secrets only through
    `{{ secret.NAME }}`, where they are tracked and redacted, never by reading the environment."""
    return {k: v for k, v in os.environ.items() if not k.startswith("NOETL_SECRET_")}


_TIMED_OUT = object()


class PythonPool:
    """`await pool.run(code, data, timeout)` runs `main` of `code` in one of `size` processes."""

    def __init__(self, size: int | None = None) -> None:
        self.size = max(1, size or os.cpu_count() or 1)
        self._lock = threading.Lock()   # the pool may be shared by event loops in several threads
        self._idle: deque[_Proc] = deque()
        self._waiters: deque[asyncio.Future] = deque()
        self._all: set[_Proc] = set()   # idle and busy: close() stops them all
        self._closed = False
        for _ in range(self.size):
            self._idle.append(self._start())

    async def run(self, code: str, data: dict[str, Any], timeout: float | None = None) -> PythonOutcome:
        try:
            payload = pickle.dumps((code, data), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            return PythonOutcome(False, error=f"step data cannot be sent to python: {type(exc).__name__}: {exc}")
        proc = await self._acquire()
        try:
            proc.send(payload)
        except OSError:
            # The idle process died (e.g. the OOM killer): replace it and try once on a fresh one.
            self._replace(proc)
            proc = await self._acquire()
            try:
                proc.send(payload)
            except OSError as exc:
                self._replace(proc)
                return PythonOutcome(False, error=f"python worker process unavailable: {exc}")

        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def readable() -> None:
            if fut.done():
                return
            frame = proc.read_available()
            if frame is not None:
                loop.remove_reader(proc.rep_fd)
                fut.set_result(frame)

        def expired() -> None:
            if not fut.done():
                loop.remove_reader(proc.rep_fd)
                fut.set_result(_TIMED_OUT)

        loop.add_reader(proc.rep_fd, readable)
        timer = loop.call_later(timeout, expired) if timeout is not None and timeout > 0 else None
        try:
            answer = await fut
        except BaseException:
            # Cancelled mid-call: the child still runs code nobody waits for; stop it for real.
            loop.remove_reader(proc.rep_fd)
            self._replace(proc)
            raise
        finally:
            if timer is not None:
                timer.cancel()

        if answer is _TIMED_OUT:
            self._replace(proc)
            return PythonOutcome(False, error=f"timed out after {format_seconds(timeout or 0)}s")
        if answer == b"":
            why = proc.exit_description()
            self._replace(proc)
            return PythonOutcome(False, error=f"python worker process {why} while running the step")
        self._release(proc)
        ok, result, error, log = json.loads(answer)
        return PythonOutcome(ok, result, error, log)

    def close(self) -> None:
        """Stop every process (a busy call then returns an error outcome) and fail waiting callers."""
        with self._lock:
            self._closed = True
            procs, self._all, self._idle = list(self._all), set(), deque()
            waiters, self._waiters = list(self._waiters), deque()
        for proc in procs:
            proc.kill()
        for w in waiters:
            _call_in_loop(w, _fail_waiter)

    def __enter__(self) -> PythonPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- bookkeeping -------------------------------------------------------------------------------
    async def _acquire(self) -> _Proc:
        with self._lock:
            if self._closed:
                raise RuntimeError("python pool is closed")
            if self._idle:
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
                self._release(fut.result())  # handed a process just as we were cancelled: pass it on
            raise

    def _release(self, proc: _Proc) -> None:
        with self._lock:
            closed = self._closed
            if not closed:
                while self._waiters:
                    waiter = self._waiters.popleft()
                    if not waiter.done():
                        _call_in_loop(waiter, lambda w: self._hand(w, proc))
                        return
                self._idle.append(proc)
                return
            self._all.discard(proc)
        proc.kill()

    def _hand(self, waiter: asyncio.Future, proc: _Proc) -> None:
        if waiter.done():         # cancelled between release and this callback
            self._release(proc)
        else:
            waiter.set_result(proc)

    def _start(self) -> _Proc:
        proc = _Proc()
        with self._lock:
            self._all.add(proc)
        return proc

    def _replace(self, proc: _Proc) -> None:
        with self._lock:
            self._all.discard(proc)
        proc.kill()
        if self._closed:
            return
        try:
            fresh = self._start()
        except Exception:
            return  # cannot start one right now: _acquire grows the pool back when it next needs one
        self._release(fresh)


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
