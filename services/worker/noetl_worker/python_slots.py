"""The engine's side of one pool slot: its supervisor process, and the step process bound to it.

A call goes straight from the engine to the step process and back (call and answer pipes, output read
from the step's own stdout pipe): no process sits in between. The supervisor (`_python_slot.py`) is asked
over a control socket only to bind a step process to an execution, to give an attempt a fresh folder, and
to end a step process with everything it started. After each call the engine looks at the step process:
if it has children left, it is ended before the answer is given.
"""
from __future__ import annotations

import asyncio
import marshal
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from noetl_worker._python_child import CUT_MARKER

_SUPERVISOR = str(Path(__file__).with_name("_python_slot.py"))
MAX_ANSWER = 256 << 20     # a step's JSON answer larger than this is refused (the bus could not carry it)
_CONTROL_TIMEOUT = 60.0    # a supervisor that does not answer a request within this is replaced


class SlotGone(Exception):
    """The supervisor died or stopped answering: the slot must be replaced."""


class Capture:
    """A step's output, bounded: its first and its last `limit / 2` bytes, with a marker between."""

    def __init__(self, limit: int) -> None:
        self.half = max(1, limit // 2)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.half - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail += chunk
        if len(self.tail) > 2 * self.half:
            del self.tail[:-self.half]

    def text(self) -> str:
        if self.total == len(self.head) + len(self.tail):
            return (self.head + self.tail).decode("utf-8", "replace")
        tail = self.tail[-self.half:]
        dropped = self.total - len(self.head) - len(tail)
        return self.head.decode("utf-8", "replace") + CUT_MARKER.format(dropped) + tail.decode("utf-8", "replace")


class Step:
    """A step process bound to one execution: the engine's ends of its pipes, and its folder.

    Its two read pipes stay registered with the event loop between calls (per-call add/remove costs two
    epoll_ctl system calls each, which measured as the largest part of a call): what arrives goes to the
    current call, or is dropped when there is none."""

    def __init__(self, pid: int, key: str | None, workdir: str, fds: list[int]) -> None:
        self.pid, self.key, self.workdir = pid, key, workdir
        self.call_w, self.reply_r, self.out_r = fds
        for fd in fds:
            os.set_blocking(fd, False)
        self.stamp = stamp(workdir)
        self.stale = False          # its folder changed: the next attempt needs a fresh one
        self.cpu = 0.0              # CPU seconds the process has used (it says so with each answer)
        self.buffer = bytearray()
        self.tasks = f"/proc/{pid}/task"
        self.loop: asyncio.AbstractEventLoop | None = None
        self.watching = {self.reply_r: False, self.out_r: False}
        self.current: tuple[asyncio.Future, Capture] | None = None
        self.ended = False          # its answer pipe reached end of file: the process is gone

    # --- one call ----------------------------------------------------------------------------------
    def begin(self, loop: asyncio.AbstractEventLoop, capture: Capture) -> asyncio.Future:
        """Start collecting one call's answer and output; the future gets (status, answer)."""
        self._attach(loop)
        self.buffer.clear()          # anything unasked for belongs to no call
        self.drain(None)             # so does output written between calls (a leftover thread's)
        done = loop.create_future()
        self.current = (done, capture)
        if self.ended:
            done.set_result(("died", b""))
        return done

    def finish(self) -> None:
        self.current = None

    def _on_answer(self) -> None:
        got = self.answer()
        if got is None:
            return
        if got == b"":
            self.ended = True
            self._unwatch(self.reply_r)     # end of file stays readable: stop listening
        if self.current is not None and not self.current[0].done():
            if isinstance(got, str):
                self.current[0].set_result(("error", got.encode()))
            else:
                self.current[0].set_result(("ok", got) if got else ("died", b""))

    def _on_output(self) -> None:
        if not self.drain(self.current[1] if self.current is not None else None):
            self._unwatch(self.out_r)       # it closed its stdout: nothing more from it

    # --- reading -----------------------------------------------------------------------------------
    def children(self) -> list[int]:
        """Processes it started that are still its children (any thread's). It is their subreaper, so
        descendants whose parent ended are here too."""
        found: list[int] = []
        try:
            for tid in os.listdir(self.tasks):
                fd = os.open(f"{self.tasks}/{tid}/children", os.O_RDONLY)
                try:
                    found += [int(p) for p in os.read(fd, 1 << 16).split()]
                finally:
                    os.close(fd)
        except OSError:
            pass
        return found

    def drain(self, capture: Capture | None) -> bool:
        """Read the output available; False at end of file."""
        while True:
            try:
                chunk = os.read(self.out_r, 1 << 16)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not chunk:
                return False
            if capture is not None:
                capture.add(chunk)

    def answer(self) -> bytes | str | None:
        """A complete answer frame; b'' at end of file; an error text; None for 'not yet'."""
        while len(self.buffer) <= MAX_ANSWER + 8:
            try:
                chunk = os.read(self.reply_r, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                return b"" if len(self.buffer) < 4 else "the step process ended in the middle of its answer"
            self.buffer += chunk
        if len(self.buffer) < 4:
            return None
        size = struct.unpack_from(">I", self.buffer)[0]
        if size > MAX_ANSWER:
            return f"the step's answer is larger than {MAX_ANSWER >> 20} MiB"
        if len(self.buffer) < 4 + size:
            return None
        payload = bytes(self.buffer[4:4 + size])
        del self.buffer[:4 + size]
        return payload if size >= 8 else "the step process sent a malformed answer"

    # --- registration with the event loop ----------------------------------------------------------
    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.loop is not loop:
            self._detach()           # the pool serves any loop; a step's readers live in one at a time
            self.loop = loop
            self.watching = {self.reply_r: False, self.out_r: False}
        for fd, callback in ((self.reply_r, self._on_answer), (self.out_r, self._on_output)):
            if not self.watching[fd] and not (fd == self.reply_r and self.ended):
                loop.add_reader(fd, callback)
                self.watching[fd] = True

    def _unwatch(self, fd: int) -> None:
        if self.loop is not None and self.watching.get(fd):
            self.loop.remove_reader(fd)
            self.watching[fd] = False

    def _detach(self) -> None:
        old, self.loop = self.loop, None
        fds = [fd for fd, on in self.watching.items() if on]
        if old is None or not fds or old.is_closed():
            return                   # a closed loop's selector is gone, its registrations with it
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if old is running or not old.is_running():
            for fd in fds:
                old.remove_reader(fd)
            return
        removed = threading.Event()   # a loop running in another thread: remove there, and wait

        def remove() -> None:
            for fd in fds:
                old.remove_reader(fd)
            removed.set()

        old.call_soon_threadsafe(remove)
        removed.wait(5)

    def close(self) -> None:
        self._detach()
        if self.current is not None and not self.current[0].done():
            self.current[0].get_loop().call_soon_threadsafe(self.current[0].cancel)
        for fd in (self.call_w, self.reply_r, self.out_r):
            try:
                os.close(fd)
            except OSError:
                pass


def stamp(path: str) -> tuple | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_ctime_ns, info.st_mode, info.st_uid, info.st_ino


class Slot:
    """One supervisor process, its control socket, and the step process it bound last."""

    def __init__(self, config: bytes, env: dict[str, str], cwd: str, stdout: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-P", _SUPERVISOR, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL, stdout=stdout, env=env, cwd=cwd, close_fds=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.control = ours
        self.step: Step | None = None
        self.control.send(config)

    @property
    def key(self) -> str | None:
        return self.step.key if self.step is not None else None

    async def request(self, message: tuple) -> tuple[Any, list[int]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        fd = self.control.fileno()

        def readable() -> None:
            try:
                data, fds, _, _ = socket.recv_fds(self.control, 1 << 16, 3)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            loop.remove_reader(fd)
            if not fut.done():
                fut.set_result((data, fds))

        try:
            self.control.send(marshal.dumps(message))
        except OSError as exc:
            raise SlotGone(f"python worker process unavailable: {exc}") from exc
        loop.add_reader(fd, readable)
        try:
            data, fds = await asyncio.wait_for(fut, _CONTROL_TIMEOUT)
        except TimeoutError:
            raise SlotGone("python worker process stopped answering") from None
        finally:
            loop.remove_reader(fd)
        if not data:
            raise SlotGone(f"python worker process {self.exit_description()}")
        return marshal.loads(data), fds

    async def bind(self, key: str | None) -> Step:
        if self.step is not None:
            self.step.close()
            self.step = None
        reply, fds = await self.request(("bind", key))
        if reply[0] != "bound" or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            raise SlotGone(f"python worker process could not start a step process: {reply}")
        self.step = Step(reply[1], key, reply[2], fds)
        return self.step

    async def refresh_workdir(self, step: Step) -> None:
        reply, _ = await self.request(("workdir", step.pid))
        if not reply[1]:
            raise SlotGone("python worker process lost its step process")
        step.workdir, step.stamp, step.stale = reply[1], stamp(reply[1]), False

    async def end(self, step: Step) -> str:
        """End the step process with everything it started; how it had ended (for a dead one)."""
        if self.step is step:
            self.step = None
        step.close()
        reply, _ = await self.request(("end", step.pid))
        return str(reply[1])

    def kill(self) -> None:
        """SIGTERM: the supervisor then kills its step processes and what they started, and exits."""
        if self.step is not None:
            self.step.close()
            self.step = None
        try:
            self.popen.send_signal(signal.SIGTERM)
            self.popen.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=5)
        except Exception:  # already gone: nothing left to stop
            pass
        self.control.close()

    def exit_description(self) -> str:
        try:
            code = self.popen.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        return f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"
