"""Issue 9, finding: no resource limits on python steps (2 GB allocations, forks, orphan processes that
outlive the step). Real step processes through the real pool: memory, CPU time, processes, open files and
file size are limited (settings, overridable per step up to a maximum), everything a step started is
killed when it ends, and each attempt works in a fresh private folder."""
from __future__ import annotations

import os
import time

import pytest

from noetl_runtime.settings import StepSettings
from noetl_worker.python_pool import PythonPool

from engine_run import as_root


@pytest.fixture(scope="module")
def pool():
    p = PythonPool(2, settings=StepSettings())
    yield p
    p.close()


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True       # dead, only not yet reaped
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


async def test_a_2gb_allocation_fails_under_the_default_limit_and_a_step_may_ask_for_more(pool):
    code = "def main():\n    return len(bytearray(2 << 30))\n"
    out = await pool.run(code, {}, 60, execution="mem")
    assert not out.ok and out.error == "MemoryError", out
    out = await pool.run(code, {}, 60, execution="mem", limits={"memory_mb": 4096})
    assert out.ok and out.result == 2 << 30, out


@pytest.mark.parametrize("limits, message", [
    ({"memory_mb": 10 ** 9}, "above the maximum"),
    ({"memory_mb": "lots"}, "positive whole number"),
    ({"cpu_seconds": -1}, "positive whole number"),
    ({"processes": True}, "positive whole number"),
    ({"processes": 2.5}, "positive whole number"),
    ({"swap_mb": 1}, "unknown limit"),
    ("unlimited", "must be a mapping"),
    ({"open_files": 10 ** 30}, "above the maximum"),
])
async def test_limits_beyond_the_maximum_or_malformed_are_refused_clearly(pool, limits, message):
    out = await pool.run("def main():\n    return 1\n", {}, 10, execution="bad", limits=limits)
    assert not out.ok and message in out.error, out


FORK_BOMB = """
import errno, os, resource, time

def main():
    # RLIMIT_NPROC counts every process of the step's user: other step processes of the machine (other
    # engines, other tests) use up part of the limit, so how many forks succeed depends on them
    uid = os.getuid()
    def mine():
        count = 0
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/status") as f:
                    count += any(line.split()[1:2] == [str(uid)] for line in f if line.startswith("Uid:"))
            except (OSError, ValueError):
                pass
        return count
    before, pids, stopped = mine(), [], None
    for _ in range(200):
        try:
            pid = os.fork()
        except OSError as exc:
            stopped = errno.errorcode.get(exc.errno, str(exc.errno))
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        pids.append(pid)
    return {"limit": list(resource.getrlimit(resource.RLIMIT_NPROC)), "before": before, "pids": pids,
            "stopped": stopped}
"""


async def test_a_fork_bomb_is_bounded_and_its_processes_die_with_the_step(pool):
    out = await pool.run(FORK_BOMB, {}, 60, execution="forks", limits={"processes": 16})
    assert out.ok, out
    bomb = out.result
    assert bomb["limit"][0] == 16, bomb                    # the step's limit is the one it asked for
    assert bomb["stopped"] == "EAGAIN", bomb               # the loop ended on the limit, not after 200 forks
    assert len(bomb["pids"]) < 16, bomb                    # whatever else of its user runs
    if bomb["before"] < 8:   # its user ran few processes, so one fork at least fitted under 16
        assert bomb["pids"], bomb
    assert all(_gone(pid) for pid in bomb["pids"])


async def test_a_daemon_that_escapes_into_its_own_session_dies_with_the_step(pool):
    code = ("import os, time\ndef main():\n    r, w = os.pipe()\n    if os.fork() == 0:\n        os.setsid()\n"
            "        if os.fork() == 0:\n            os.write(w, str(os.getpid()).encode())\n"
            "            time.sleep(60)\n        os._exit(0)\n    return int(os.read(r, 32))\n")
    out = await pool.run(code, {}, 30, execution="daemon")
    assert out.ok, out
    assert _gone(out.result)


async def test_a_subprocess_left_running_dies_when_the_step_ends(pool):
    code = ("import subprocess\ndef main():\n    return subprocess.Popen(['sleep', '60']).pid\n")
    out = await pool.run(code, {}, 30, execution="sub")
    assert out.ok and _gone(out.result), out


async def test_cpu_time_is_limited(pool):
    out = await pool.run("def main():\n    while True:\n        pass\n", {}, 60, execution="cpu",
                         limits={"cpu_seconds": 1})
    assert not out.ok and "CPU time limit" in out.error, out


async def test_file_size_and_open_files_are_limited(pool):
    out = await pool.run("def main():\n    open('big', 'wb').write(b'x' * (3 << 20))\n", {}, 30, execution="fs",
                         limits={"file_size_mb": 1})
    assert not out.ok and "File too large" in out.error, out
    out = await pool.run("def main():\n    return [open('/dev/null') for _ in range(200)]\n", {}, 30,
                         execution="fs", limits={"open_files": 32})
    assert not out.ok and "Too many open files" in out.error, out


async def test_each_attempt_gets_a_fresh_private_folder(pool):
    code = ("import os\ndef main(write):\n    here = os.getcwd()\n    before = os.listdir(here)\n"
            "    if write:\n        open('left-behind', 'w').write('x')\n"
            "    try:\n        siblings = os.listdir(os.path.dirname(here))\n    except OSError:\n"
            "        siblings = 'refused'\n"
            "    return {'cwd': here, 'before': before, 'siblings': siblings, 'home': os.environ['HOME'],\n"
            "            'tmp': os.environ['TMPDIR'], 'mode': oct(os.stat(here).st_mode & 0o777)}\n")
    first = (await pool.run(code, {"write": True}, 10, execution="dirs")).result
    second = (await pool.run(code, {"write": False}, 10, execution="dirs")).result
    third = (await pool.run(code, {"write": False}, 10, execution="dirs")).result
    assert first["before"] == [] and second["before"] == [] and third["before"] == []
    assert first["cwd"] == first["home"] == first["tmp"] and first["mode"] == "0o700"
    assert second["cwd"] != first["cwd"] and not os.path.exists(first["cwd"])   # touched: replaced
    assert first["siblings"] == "refused" or os.geteuid() != 0                   # others' folders unlisted


async def test_what_one_execution_leaves_in_memory_never_meets_another(pool):
    patch = ("import base64, json, threading, time\ndef main():\n    base64.b64encode = lambda b: b'stolen'\n"
             "    json.PLANTED = 1\n    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n")
    probe = ("import base64, json, threading\ndef main():\n"
             "    return [hasattr(json, 'PLANTED'), base64.b64encode(b'x') == b'eA==', threading.active_count()]\n")
    assert (await pool.run(patch, {}, 10, execution="A")).ok
    assert (await pool.run(probe, {}, 10, execution="A")).result[0] is True   # the same execution may see it
    assert (await pool.run(probe, {}, 10, execution="B")).result == [False, True, 1]
    assert (await pool.run(probe, {}, 10, execution="C")).result == [False, True, 1]


@as_root
async def test_steps_run_as_the_step_user_and_cannot_regain_root(pool):
    import pwd
    code = ("import os\ndef main():\n    try:\n        os.setuid(0)\n        regained = True\n"
            "    except PermissionError:\n        regained = False\n"
            "    return [os.getuid(), os.geteuid(), os.getgid(), os.getgroups(), regained]\n")
    out = await pool.run(code, {}, 10, execution="user")
    nobody = pwd.getpwnam("nobody")
    assert out.result == [nobody.pw_uid, nobody.pw_uid, nobody.pw_gid, [], False], out


async def test_step_processes_never_outlive_their_supervisor():
    """A worker killed with its process group (a node dying) takes its steps along: a step process dies
    with its slot's supervisor, even in a session of its own."""
    import asyncio
    import signal
    with PythonPool(1, settings=StepSettings()) as lone:
        task = asyncio.create_task(lone.run("import time\ndef main():\n    time.sleep(60)\n", {}, None,
                                            execution="orphaned"))
        supervisor = next(iter(lone._all)).popen.pid
        deadline = time.monotonic() + 10
        steps: list[int] = []
        while not steps and time.monotonic() < deadline:   # the bound step process (and the spare)
            await asyncio.sleep(0.05)
            with open(f"/proc/{supervisor}/task/{supervisor}/children") as f:
                steps = [int(p) for p in f.read().split()]
        assert steps
        os.kill(supervisor, signal.SIGKILL)
        assert all(_gone(pid) for pid in steps)
        out = await task
        assert not out.ok
