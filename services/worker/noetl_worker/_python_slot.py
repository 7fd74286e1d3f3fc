"""The supervisor of one slot of the python pool: it never runs step code, it runs step processes.

Started by python_pool.py as a fresh interpreter (`python -P _python_slot.py REQ_FD REPLY_FD`, standard
library only) with the scrubbed environment steps get, then sent its configuration as the first frame.
For each call it:

- hands the step to a *step process*: a fork of itself in its own session, with hard resource limits, no
  core dumps, not dumpable, running as the step user when the engine runs as root. A step process serves
  one execution only: a call for another execution (or for none) gets a fresh one, so nothing a
  playbook's code leaves in memory (patched modules, threads) meets another execution's data. A fresh
  one is forked and warmed up ahead of need (the spare), so changing executions costs no fork on the way;
- gives the attempt a private working directory that no earlier attempt touched;
- reads the step's output (fd 1 and 2: print, C code, subprocesses), keeping its start and its end;
- enforces the timeout, and when the step ends kills whatever it started: a step process that has child
  processes is killed with its whole process group, and processes that escaped into their own session
  come back to this supervisor (a child subreaper) and are killed too, before the answer goes out.

Calls are `(execution, timeout, limits)` + the pickled step; replies are `(status, detail, log)` (status:
ok | timeout | died | error) + the step process's JSON answer. Work that need not delay an answer
(reaping killed step processes, removing their folders, forking the next spare) is done after it.
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import pathlib
import secrets
import select
import shutil
import signal
import struct
import sys
import time
from typing import Any

_spec = importlib.util.spec_from_file_location("_noetl_step_runner",
                                               pathlib.Path(__file__).with_name("_python_child.py"))
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)

_PR_SET_DUMPABLE, _PR_SET_CHILD_SUBREAPER = 4, 36
_MAX_ANSWER = 256 << 20   # a step's JSON answer larger than this is refused (the bus could not carry it)
_WARM_UP = "def main():\n    return None\n"
_libc = ctypes.CDLL(None, use_errno=True)


def prctl(option: int, value: int) -> None:
    _libc.prctl(option, value, 0, 0, 0)


class Capture:
    """The step's output, bounded: its first and its last `limit / 2` bytes, with a marker between."""

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
        return (self.head.decode("utf-8", "replace") + runner.CUT_MARKER.format(dropped)
                + tail.decode("utf-8", "replace"))


class StepProcess:
    """A forked step process (bound to one execution once used) and the supervisor's ends of its pipes."""

    def __init__(self, slot: Slot) -> None:
        self.key: str | None = None
        self.cpu = 0.0
        self.workdir, self.stamp = slot.make_workdir()   # the attempts' folder, reused only while untouched
        call_r, self.call_w = os.pipe()
        self.reply_r, reply_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:   # the step process
            code = 70
            try:
                _become_step_process(slot, call_r, reply_w, out_w)
                runner.step_main(call_r, reply_w, slot.base_env)
                code = 0
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        for fd in (call_r, reply_w, out_w):
            os.close(fd)
        for fd in (self.call_w, self.reply_r, self.out_r):
            os.set_blocking(fd, False)
        self.pidfd = os.pidfd_open(self.pid)
        self.status: int | None = None
        self.tasks = f"/proc/{self.pid}/task"
        self.poller = select.poll()       # registered once: a call then costs no setup
        for fd in (self.reply_r, self.out_r, self.pidfd, slot.req_fd):
            self.poller.register(fd, select.POLLIN)
        self.warming = False

    def children(self) -> list[int]:
        """Processes this step process started that are still its children (any thread's)."""
        found: list[int] = []
        try:
            for tid in os.listdir(self.tasks):
                found += _read_pids(f"{self.tasks}/{tid}/children")
        except OSError:
            pass
        return found

    def signal_kill(self) -> None:
        for target in (lambda: os.killpg(self.pid, signal.SIGKILL), lambda: os.kill(self.pid, signal.SIGKILL)):
            try:
                target()
            except OSError:
                pass

    def reap(self, block: bool = True) -> int | None:
        if self.status is None:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            if pid:
                self.status = status
        return self.status

    def close(self) -> None:
        for fd in (self.call_w, self.reply_r, self.out_r, self.pidfd):
            os.close(fd)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _become_step_process(slot: Slot, call_r: int, reply_w: int, out_w: int) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)    # the supervisor's handlers are not the step's
    os.setsid()
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    keep = sorted({call_r, reply_w})
    os.closerange(3, keep[0])
    os.closerange(keep[0] + 1, keep[1])
    os.closerange(keep[1] + 1, 1 << 20)
    os.umask(0o077)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the file-size limit fails (EFBIG), clearly
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for name, value in slot.hard.items():
        which, unit = runner.RLIMITS[name]
        current = resource.getrlimit(which)[1]
        hard = value * unit if current == resource.RLIM_INFINITY else min(value * unit, current)
        resource.setrlimit(which, (hard, hard))   # soft limits are set per call, below this
    if slot.uid is not None:
        held = _hold_import_paths()
        os.setgroups([])
        os.setgid(slot.gid)
        os.setuid(slot.uid)
        if os.getuid() != slot.uid or os.geteuid() != slot.uid:
            raise RuntimeError("could not switch to the step user")
        _reach_import_paths(held)
    prctl(_PR_SET_DUMPABLE, 0)


def _hold_import_paths() -> dict[str, int]:
    """An O_PATH descriptor of each import folder, opened while still root."""
    held: dict[str, int] = {}
    for path in sys.path:
        try:
            held[path] = os.open(path or ".", os.O_PATH | os.O_DIRECTORY)
        except OSError:
            pass
    return held


def _reach_import_paths(held: dict[str, int]) -> None:
    """Import folders the step user cannot reach by name (Python installed under /root, a 0700 home) are
    reached through the descriptor held for them (/proc/self/fd/N), so the step can import the standard
    library and the engine's packages, and nothing else of the folders above them."""
    for i, path in enumerate(sys.path):
        fd = held.pop(path, None)
        if fd is None:
            continue
        if os.access(path or ".", os.R_OK | os.X_OK):
            os.close(fd)
        else:
            sys.path[i] = f"/proc/self/fd/{fd}"
    for fd in held.values():
        os.close(fd)
    importlib.invalidate_caches()


class Slot:
    def __init__(self, config: dict[str, Any], req_fd: int, reply_fd: int) -> None:
        self.uid, self.gid = config.get("uid"), config.get("gid")
        self.base: str = config["base"]
        self.hard: dict[str, int] = config["hard"]
        self.log_max: int = config["log_max"]
        self.base_env = dict(os.environ)
        self.req_fd, self.reply_fd = req_fd, reply_fd
        self.step: StepProcess | None = None    # bound to the execution of the last call
        self.spare: StepProcess | None = None   # forked and warmed up, bound to nothing yet
        self.dying: list[StepProcess] = []      # killed, not yet reaped
        self.own_children = f"/proc/{os.getpid()}/task/{os.getpid()}/children"

    # --- one call --------------------------------------------------------------------------------
    def serve(self, header: tuple, blob: bytes) -> bytes:
        key, timeout, limits = header
        step = self.step
        if step is not None and (step.key != key or key is None
                                 or step.cpu + limits["cpu_seconds"] + 1 >= self.hard["cpu_seconds"]):
            self.end(step)   # another execution (or its CPU time nearly spent): a fresh step process
            step = None
        if step is None:
            step = self.step = self.take_spare()
            step.key = key
        if step.workdir is None:
            step.workdir, step.stamp = self.make_workdir()
        status, detail, answer, log = self._exchange(step, timeout, runner.pack((step.workdir, limits), blob))
        if status != "ok" or key is None or step.children():
            self.end(step)
        elif _stamp(step.workdir) != step.stamp:
            # An attempt's folder is fresh for the next one only while nothing in it changed (a file made
            # or removed, a chmod, an ACL: each moves its mtime or ctime).
            shutil.rmtree(step.workdir, ignore_errors=True)
            step.workdir = None
        self.kill_orphans()
        return runner.pack((status, detail, log), answer)

    def take_spare(self) -> StepProcess:
        spare, self.spare = self.spare, None
        if spare is not None and spare.warming:
            status, *_ = self._exchange(spare, 30, None)
            spare.warming = False
            if status != "ok" or _stamp(spare.workdir) != spare.stamp:
                self.end(spare)
                spare = None
        return spare if spare is not None else StepProcess(self)

    def tidy(self) -> None:
        """After an answer went out: reap what was killed, and have a warm spare ready."""
        for step in list(self.dying):
            if step.reap(block=False) is not None:
                self.dying.remove(step)
                step.close()
        if self.spare is None:
            self.spare = StepProcess(self)
            self.spare.warming = True
            warm_up = runner.pack((self.spare.workdir, {}), runner.pickle.dumps((_WARM_UP, {}, None)))
            os.write(self.spare.call_w, runner.frame(warm_up))   # small: the pipe takes it at once

    def make_workdir(self) -> tuple[str, tuple | None]:
        path = os.path.join(self.base, secrets.token_hex(12))
        os.mkdir(path, 0o700)
        if self.uid is not None:
            os.chown(path, self.uid, self.gid)
        return path, _stamp(path)

    def _exchange(self, step: StepProcess, timeout: float | None,
                  request: bytes | None) -> tuple[str, str, bytes, str]:
        """Send `request` (None: only read the answer of one sent earlier) and collect answer and output."""
        _drain(step.out_r, None)   # output written between calls (a leftover thread's) belongs to none
        capture = Capture(self.log_max)
        pending = memoryview(runner.frame(request) if request is not None else b"")
        if pending:
            try:                   # most calls fit in the pipe at once: no need to wait for room
                pending = pending[os.write(step.call_w, pending):]
            except BlockingIOError:
                pass
            except OSError:        # the step process is gone: its pidfd says how
                pending = pending[:0]
        answer = bytearray()
        deadline = time.monotonic() + timeout if timeout else None
        poller = step.poller
        if pending:
            poller.register(step.call_w, select.POLLOUT)
        try:
            while True:
                wait = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
                events = poller.poll(wait)
                if not events and deadline is not None and time.monotonic() >= deadline:
                    return "timeout", "", b"", capture.text()
                for fd, event in events:
                    if fd == step.call_w:
                        try:
                            pending = pending[os.write(fd, pending):]
                        except BlockingIOError:
                            continue
                        except OSError:      # the step process is gone: its pidfd says how
                            pending = pending[:0]
                        if not pending:
                            poller.unregister(fd)
                    elif fd == step.out_r:
                        if not _drain(fd, capture):
                            poller.unregister(fd)   # the step closed its stdout: no more output this life
                    elif fd == step.reply_r or fd == step.pidfd:
                        done = _read_answer(step.reply_r, answer)
                        if done is None and fd == step.pidfd:
                            _drain(step.out_r, capture)
                            return "died", describe_exit(step.reap(), self.hard), b"", capture.text()
                        if done is None:
                            if not answer and event & select.POLLHUP:
                                poller.unregister(fd)
                            continue
                        _drain(step.out_r, capture)
                        if isinstance(done, str):
                            return "error", done, b"", capture.text()
                        step.cpu = struct.unpack_from(">d", done)[0]
                        return "ok", "", done[8:], capture.text()
                    elif fd == self.req_fd:     # the engine closed our pipe (it stopped or died): stop now
                        self.shutdown()
        finally:
            if pending:
                poller.unregister(step.call_w)

    # --- ending step processes -------------------------------------------------------------------
    def end(self, step: StepProcess) -> None:
        """Kill a step process. If it has children, wait until it and everything it started is gone
        (they must not outlive the step); otherwise reap it later, off the answer's path."""
        if self.step is step:
            self.step = None
        thorough = bool(step.children())
        step.signal_kill()
        if thorough:
            step.reap()
            step.close()
            self.kill_orphans()
        else:
            self.dying.append(step)

    def kill_orphans(self) -> None:
        """Kill processes a step left behind that became our children (we are their subreaper)."""
        known = {s.pid for s in (self.step, self.spare, *self.dying) if s is not None}
        for _ in range(10_000):
            orphans = [p for p in _read_pids(self.own_children) if p not in known]
            if not orphans:
                return
            for pid in orphans:
                for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                    try:
                        target()
                    except OSError:
                        pass
            for pid in orphans:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass

    def shutdown(self, *_: Any) -> None:
        for step in (self.step, self.spare, *self.dying):
            if step is not None:
                step.signal_kill()
                step.reap()
                step.close()
        self.step = self.spare = None
        self.dying = []
        self.kill_orphans()
        os._exit(0)


def _stamp(path: str) -> tuple | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_ctime_ns, info.st_mode, info.st_uid, info.st_ino


def _read_pids(path: str) -> list[int]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return []
    try:
        return [int(p) for p in os.read(fd, 1 << 16).split()]
    except OSError:
        return []
    finally:
        os.close(fd)


def _drain(fd: int, capture: Capture | None) -> bool:
    """Read what is available; False at end of file."""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not chunk:
            return False
        if capture is not None:
            capture.add(chunk)


def _read_answer(fd: int, buffer: bytearray) -> bytes | str | None:
    """A complete answer frame, an error text for a malformed one, or None for 'not yet'."""
    while len(buffer) <= _MAX_ANSWER + 8:
        try:
            chunk = os.read(fd, 1 << 20)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        buffer += chunk
    if len(buffer) < 4:
        return None
    size = struct.unpack_from(">I", buffer)[0]
    if size > _MAX_ANSWER:
        return f"the step's answer is larger than {_MAX_ANSWER >> 20} MiB"
    if len(buffer) < 4 + size:
        return None
    if size < 8:
        return "the step process sent a malformed answer"
    return bytes(buffer[4:4 + size])


def describe_exit(status: int, hard: dict[str, int]) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with code {code}"
    signum = -code
    if signum == signal.SIGXCPU:
        return "exceeded its CPU time limit (limits.cpu_seconds) and was stopped"
    name = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
    return f"was killed by signal {signum} ({name})"


def main(req_fd: int, reply_fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole group; the engine decides
    prctl(_PR_SET_DUMPABLE, 0)          # no other process of our user may read our memory
    prctl(_PR_SET_CHILD_SUBREAPER, 1)   # orphans of a step come back to us, to be killed
    payload = runner.read_frame(req_fd)
    if payload is None:
        return
    config = json.loads(payload)
    for name in config.get("preload", []):
        try:
            __import__(name)
        except Exception as exc:
            print(f"noetl python pool: cannot preload module {name!r}: {exc}", file=sys.stderr)
    slot = Slot(config, req_fd, reply_fd)
    signal.signal(signal.SIGTERM, slot.shutdown)
    slot.tidy()
    while True:
        payload = runner.read_frame(req_fd)
        if not payload:
            slot.shutdown()
        header, blob = runner.unpack(payload)
        reply = slot.serve(header, blob)
        runner.write_all(reply_fd, struct.pack(">I", len(reply)) + reply)
        slot.tidy()


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]), int(sys.argv[2]))
    except (BrokenPipeError, ConnectionResetError):
        pass   # the engine is gone: nobody is waiting for this answer
