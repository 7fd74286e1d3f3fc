"""The supervisor of one slot of the python pool: it never runs step code, it makes and ends step processes.

Started by python_pool.py as a fresh interpreter (`python -P _python_slot.py CONTROL_FD`, standard library
only) with the scrubbed environment steps get; its configuration comes as the first message on the control
socket (AF_UNIX, SOCK_SEQPACKET: one message per request). It:

- forks *step processes* from itself: each in its own session, with hard resource limits, no core dumps,
  not dumpable, running as the step user when the engine runs as root, and a private working folder. A
  warmed-up spare is kept ready, so binding a step process to an execution costs no fork on the way;
- hands a bound step process's pipes (call, answer, output) to the engine, which then talks to it directly:
  a call costs no hop through this process;
- ends step processes when asked (a step that left processes, a timeout, another execution), killing their
  whole process group and every process that escaped into its own session: those come back to this
  process, a child subreaper, and are killed on every request and at least once a second.

Requests (marshal tuples) and replies:
  ("bind", execution)      -> ("bound", pid, workdir) + the step's three pipe ends; the slot's previous step
                              process is ended first
  ("end", pid)             -> ("ended", how it ended): killed with everything it started, reaped
  ("workdir", pid)         -> ("workdir", path): a fresh folder for the next attempt, the old one removed
"""
from __future__ import annotations

import ctypes
import importlib.util
import marshal
import os
import pathlib
import secrets
import select
import shutil
import signal
import socket
import sys
from typing import Any

_spec = importlib.util.spec_from_file_location("_noetl_step_runner",
                                               pathlib.Path(__file__).with_name("_python_child.py"))
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)

_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_CHILD_SUBREAPER = 1, 4, 36
_WARM_UP = "def main():\n    return None\n"
_SWEEP_MS = 1000       # orphans that escaped a step are looked for at least this often
_libc = ctypes.CDLL(None, use_errno=True)


def prctl(option: int, value: int) -> None:
    _libc.prctl(option, value, 0, 0, 0)


class StepProcess:
    """A forked step process and, until they are handed to the engine, the supervisor's ends of its pipes."""

    def __init__(self, slot: Slot) -> None:
        self.workdir = slot.make_workdir()
        call_r, self.call_w = os.pipe()
        self.reply_r, reply_w = os.pipe()
        self.out_r, out_w = os.pipe()
        supervisor = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:   # the step process
            code = 70
            try:
                _become_step_process(slot, supervisor, call_r, reply_w, out_w)
                runner.step_main(call_r, reply_w, slot.base_env)
                code = 0
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        for fd in (call_r, reply_w, out_w):
            os.close(fd)
        # Warm it up now (imports, compile, JSON, the v10 script prelude): its first real call then runs at
        # full speed. The call is (code, data, context, script), as step_main reads it.
        warm_up = runner.pack((self.workdir, {}), runner.pickle.dumps((_WARM_UP, {}, None, "")))
        runner.write_all(self.call_w, runner.frame(warm_up))
        self.status: int | None = None

    def ready(self) -> bool:
        """Read the warm-up's answer (waiting a little for it); False if the process did not answer."""
        poller = select.poll()
        poller.register(self.reply_r, select.POLLIN)
        if not poller.poll(10_000):
            return False
        try:
            payload = runner.read_frame(self.reply_r)
        except OSError:
            return False
        os.set_blocking(self.out_r, False)
        try:
            while os.read(self.out_r, 1 << 16):
                pass
        except BlockingIOError:
            pass
        return payload is not None

    def hand_over(self) -> list[int]:
        fds = [self.call_w, self.reply_r, self.out_r]
        self.call_w = self.reply_r = self.out_r = -1
        return fds

    def close_pipes(self) -> None:
        for fd in (self.call_w, self.reply_r, self.out_r):
            if fd >= 0:
                os.close(fd)
        self.call_w = self.reply_r = self.out_r = -1


def _become_step_process(slot: Slot, supervisor: int, call_r: int, reply_w: int, out_w: int) -> None:
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
    # In its own session, a step process would outlive a supervisor killed with the engine (SIGKILL of the
    # worker's process group) and run on with nobody to report to: it dies with its supervisor instead. Set
    # after the user switch, which clears it; a supervisor gone already means there is nobody to serve.
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor:
        os._exit(1)
    # Its own descendants that lose their parent come back to it, so the engine sees them as its children
    # (code that undoes this only moves them to the supervisor, which kills them within a second).
    prctl(_PR_SET_CHILD_SUBREAPER, 1)


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
    def __init__(self, config: dict[str, Any], control: socket.socket) -> None:
        self.uid, self.gid = config.get("uid"), config.get("gid")
        self.base: str = config["base"]
        self.hard: dict[str, int] = config["hard"]
        self.base_env = dict(os.environ)
        self.control = control
        self.step: StepProcess | None = None    # bound to an execution; its pipes are the engine's
        self.spare: StepProcess | None = None   # forked and warming up, bound to nothing yet
        self.dying: dict[int, StepProcess] = {}  # killed, not yet reaped
        self.own_children = f"/proc/{os.getpid()}/task/{os.getpid()}/children"

    def handle(self, request: tuple) -> tuple[tuple, list[int]]:
        op = request[0]
        if op == "bind":
            return self.bind(), []
        if op == "end":
            return ("ended", self.end(request[1])), []
        if op == "workdir":
            return ("workdir", self.new_workdir(request[1])), []
        return ("error", f"unknown request {op!r}"), []

    def bind(self) -> tuple:
        if self.step is not None:
            # It left no process after its last call (the engine checks); if it has one now, wait for it
            # all to be gone, else reap it later, off the way.
            old, self.step = self.step, None
            self._kill(old, thorough=bool(_children(old.pid)))
        step, self.spare = self.spare, None
        if step is None or not step.ready():
            if step is not None:
                self._kill(step, thorough=True)
            step = StepProcess(self)
            if not step.ready():
                self._kill(step, thorough=True)
                return ("error", "a new step process did not start")
        self.step = step
        return ("bound", step.pid, step.workdir)

    def end(self, pid: int) -> str:
        """Kill a step process with everything it started; reap it; say how it had ended."""
        step = self.step if self.step is not None and self.step.pid == pid else self.dying.get(pid)
        if step is None:
            return "was already gone"
        if step is self.step:
            self.step = None
        self._kill(step, thorough=True)
        return describe_exit(step.status)

    def new_workdir(self, pid: int) -> str:
        step = self.step
        if step is None or step.pid != pid:
            return ""
        shutil.rmtree(step.workdir, ignore_errors=True)
        step.workdir = self.make_workdir()
        return step.workdir

    def make_workdir(self) -> str:
        path = os.path.join(self.base, secrets.token_hex(12))
        os.mkdir(path, 0o700)
        if self.uid is not None:
            os.chown(path, self.uid, self.gid)
        return path

    def _kill(self, step: StepProcess, thorough: bool) -> None:
        for target in (lambda: os.killpg(step.pid, signal.SIGKILL), lambda: os.kill(step.pid, signal.SIGKILL)):
            try:
                target()
            except OSError:
                pass
        step.close_pipes()
        if thorough:
            if step.status is None:
                step.status = os.waitpid(step.pid, 0)[1]
            self.dying.pop(step.pid, None)
            shutil.rmtree(step.workdir, ignore_errors=True)
            self.kill_orphans()
        else:
            self.dying[step.pid] = step

    # --- housekeeping (after each request, and at least once a second) -----------------------------
    def tidy(self) -> None:
        for pid, step in list(self.dying.items()):
            if os.waitpid(pid, os.WNOHANG)[0]:
                del self.dying[pid]
                shutil.rmtree(step.workdir, ignore_errors=True)
        self.kill_orphans()
        if self.spare is None:
            self.spare = StepProcess(self)

    def kill_orphans(self) -> None:
        """Kill processes a step left behind that became our children (we are their subreaper)."""
        known = {s.pid for s in (self.step, self.spare) if s is not None} | set(self.dying)
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
        for step in (self.step, self.spare, *self.dying.values()):
            if step is not None:
                self._kill(step, thorough=True)
        self.kill_orphans()
        os._exit(0)


def _children(pid: int) -> list[int]:
    """The processes `pid` started that are still its children (any thread's)."""
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            found += _read_pids(f"/proc/{pid}/task/{tid}/children")
    except OSError:
        pass
    return found


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


def describe_exit(status: int | None) -> str:
    if status is None:
        return "was already gone"
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with code {code}"
    signum = -code
    if signum == signal.SIGXCPU:
        return "exceeded its CPU time limit (limits.cpu_seconds) and was stopped"
    name = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
    return f"was killed by signal {signum} ({name})"


def main(control_fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole group; the engine decides
    prctl(_PR_SET_DUMPABLE, 0)          # no other process of our user may read our memory
    prctl(_PR_SET_CHILD_SUBREAPER, 1)   # orphans of a step come back to us, to be killed
    control = socket.socket(fileno=control_fd)
    config = marshal.loads(control.recv(1 << 16) or marshal.dumps(None))
    if config is None:
        return
    for name in (*runner.SCRIPT_MODULES, *config.get("preload", [])):
        try:
            __import__(name)
        except Exception as exc:
            print(f"noetl python pool: cannot preload module {name!r}: {exc}", file=sys.stderr)
    slot = Slot(config, control)
    signal.signal(signal.SIGTERM, slot.shutdown)
    slot.tidy()
    poller = select.poll()
    poller.register(control, select.POLLIN)
    while True:
        if not poller.poll(_SWEEP_MS):
            slot.tidy()
            continue
        message = control.recv(1 << 16)
        if not message:          # the engine closed the socket (it stopped or died)
            slot.shutdown()
        reply, fds = slot.handle(marshal.loads(message))
        if reply[0] == "bound":
            fds = slot.step.hand_over()
        socket.send_fds(control, [marshal.dumps(reply)], fds)
        for fd in fds:
            os.close(fd)
        slot.tidy()


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]))
    except (BrokenPipeError, ConnectionResetError):
        pass   # the engine is gone: nobody is waiting for this answer
