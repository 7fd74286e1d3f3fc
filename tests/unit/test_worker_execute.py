"""execute(): the worker contract end to end, with real actions and in-memory ports."""
import asyncio
import dataclasses
import uuid

import pytest

from noetl_common.messages import (ActionCompleted, ActionFailed, ActionHeartbeat, ActionStarted, ChildStarted,
                                   StartExecution)
from noetl_worker.execute import child_execution_id, execute
from noetl_worker.ports import WorkerPorts
from noetl_worker.python_pool import PythonPool

from test_worker_support import BEARER, Emitted, HttpFixture, MemoryCatalog, MemoryCredentials, command, save_spec

API_KEY = "k3y-vAlue-9f8e7d"


@pytest.fixture(scope="module")
def pool():
    p = PythonPool(2)
    yield p
    p.close()


@pytest.fixture(scope="module")
def server():
    s = HttpFixture()
    yield s
    s.close()


def make_ports(pool=None, creds=None, env=None, catalog=None, emit=None):
    return WorkerPorts(emit=emit if emit is not None else Emitted(), credentials=MemoryCredentials(creds or {}), catalog=catalog,
                       python_pool=pool, worker_id="w-1", env=env if env is not None else {})


async def run(cmd, ports):
    await execute(cmd, ports)
    return ports.emit


async def test_a_quick_python_step_reports_once_with_its_start_time(pool):
    cmd = command("python", data={"n": 4}, config={"code": "def main(n):\n    print('squaring', n)\n    return n * n\n"})
    emitted = await run(cmd, dataclasses.replace(make_ports(pool), announce_after=30.0))
    assert emitted.kinds() == ["action_completed"]
    done = emitted.last()
    assert isinstance(done, ActionCompleted) and done.result == 16 and done.log == "squaring 4\n"
    assert done.command_id == cmd.command_id and done.started is not None and done.started <= done.time
    assert done.saved is None and done.variables == {}


async def test_a_slower_python_step_announces_its_start_first(pool):
    cmd = command("python", config={"code": "import time\ndef main():\n    time.sleep(0.3)\n    return 1\n"})
    emitted = await run(cmd, dataclasses.replace(make_ports(pool), announce_after=0.01))
    assert emitted.kinds() == ["action_started", "action_completed"]
    started, done = emitted
    assert isinstance(started, ActionStarted) and started.worker_id == "w-1"
    assert started.command_id == cmd.command_id and started.execution_id == "exec-1"
    assert done.started is None      # the fold already knows when it started


async def test_envelope_is_unwrapped(pool):
    code = "def main():\n    return {'status': 'success', 'data': {'x': 10}}\n"
    done = (await run(command("python", config={"code": code}), make_ports(pool))).last()
    assert done.result == {"x": 10}


async def test_heartbeats_while_the_action_runs(pool):
    code = "import time\ndef main():\n    time.sleep(0.8)\n    return 1\n"
    emitted = await run(command("python", config={"code": code}, lease_seconds=0.6), make_ports(pool))
    kinds = emitted.kinds()
    assert kinds[0] == "action_started" and kinds[-1] == "action_completed"
    assert kinds.count("heartbeat") >= 2
    assert all(isinstance(m, ActionHeartbeat) for m in emitted[1:-1])


async def test_python_failure_carries_error_and_log(pool):
    code = "def main():\n    print('working')\n    raise KeyError('missing')\n"
    failed = (await run(command("python", config={"code": code}), make_ports(pool))).last()
    assert isinstance(failed, ActionFailed) and failed.error == "KeyError: 'missing'"
    assert failed.log.startswith("working\n") and "Traceback" in failed.log


async def test_python_timeout_fails_the_attempt(pool):
    code = "def main():\n    while True:\n        pass\n"
    failed = (await run(command("python", config={"code": code}, timeout=1), make_ports(pool))).last()
    assert isinstance(failed, ActionFailed) and failed.error == "timed out after 1s"
    ok = (await run(command("python", config={"code": "def main():\n    return 'next'\n"}), make_ports(pool))).last()
    assert ok.result == "next"


async def test_deferred_secret_from_env_is_sent_but_never_reported(server):
    cmd = command("http", config={"method": "POST", "endpoint": f"{server.url}/echo",
                                  "headers": {"X-Api-Key": "{{ secret.API_KEY }}"}},
                  data={"note": "sent"}, deferred=["config.headers.X-Api-Key"])
    emitted = await run(cmd, make_ports(env={"NOETL_SECRET_API_KEY": API_KEY}))
    done = emitted.last()
    assert isinstance(done, ActionCompleted), done
    assert server.calls[-1]["headers"]["x-api-key"] == API_KEY
    assert API_KEY not in repr(list(emitted))
    assert done.result["data"]["headers"]["x-api-key"] == "***"
    # The command itself still holds the template, not the value.
    assert cmd.action.config["headers"]["X-Api-Key"] == "{{ secret.API_KEY }}"


async def test_secret_from_credential_store_and_header_with_dotted_name(server):
    creds = {"partner": ("generic", {"token": "tok-from-store-123"}), "raw": ("generic", {"a": "whole-1", "b": "whole-2"})}
    cmd = command("http", config={"endpoint": f"{server.url}/echo",
                                  "headers": {"X.Partner.Token": "{{ secret.partner }}", "X-Whole": "{{ secret.raw.b }}"}},
                  deferred=["config.headers.X.Partner.Token", "config.headers.X-Whole"])
    emitted = await run(cmd, make_ports(creds=creds))
    assert isinstance(emitted.last(), ActionCompleted), emitted.last()
    assert server.calls[-1]["headers"]["x.partner.token"] == "tok-from-store-123"
    assert server.calls[-1]["headers"]["x-whole"] == "whole-2"
    assert "tok-from-store-123" not in repr(list(emitted)) and "whole-2" not in repr(list(emitted))


async def test_missing_secret_names_it_and_default_still_works(pool):
    cmd = command("python", data={"k": "{{ secret.NOPE }}"}, deferred=["data.k"],
                  config={"code": "def main(k):\n    return k\n"})
    failed = (await run(cmd, make_ports(pool))).last()
    assert isinstance(failed, ActionFailed)
    assert "cannot render data.k" in failed.error and "NOETL_SECRET_NOPE" in failed.error
    cmd = command("python", data={"k": "{{ secret.NOPE | default('fallback') }}"}, deferred=["data.k"],
                  config={"code": "def main(k):\n    return k\n"})
    assert (await run(cmd, make_ports(pool))).last().result == "fallback"


async def test_secret_in_python_data_is_redacted_from_result_and_log(pool):
    code = "def main(token):\n    print('token is', token)\n    return {'echo': token, 'len': len(token)}\n"
    cmd = command("python", data={"token": "{{ secret.TOKEN }}"}, deferred=["data.token"], config={"code": code})
    emitted = await run(cmd, make_ports(pool, env={"NOETL_SECRET_TOKEN": "py-secret-555"}))
    done = emitted.last()
    assert done.result == {"echo": "***", "len": 13} and done.log == "token is ***\n"
    assert "py-secret-555" not in repr(list(emitted))


async def test_uuid_and_now_in_deferred_templates(pool):
    cmd = command("python", data={"id": "{{ uuid() }}", "at": "{{ now() }}"}, deferred=["data.id", "data.at"],
                  config={"code": "def main(id, at):\n    return [id, at]\n"})
    done = (await run(cmd, make_ports(pool))).last()
    the_id, at = done.result
    uuid.UUID(the_id)
    assert at.startswith("2023-11-14T22:13:20")    # the command's time: replays render the same


async def test_bearer_credential_header(server):
    creds = {"api_token": ("bearer", {"token": BEARER})}
    emitted = await run(command("http", config={"endpoint": f"{server.url}/auth/bearer"}, auth="api_token"),
                        make_ports(creds=creds))
    assert emitted.last().result["status_code"] == 200
    assert BEARER not in repr(list(emitted))


async def test_credential_value_echoed_in_an_error_is_redacted(server):
    creds = {"k": ("api_key", {"header": "X-Api-Key", "value": "leaky-value-321"})}
    failed = (await run(command("http", config={"endpoint": f"{server.url}/leak"}, auth="k"),
                        make_ports(creds=creds))).last()
    assert isinstance(failed, ActionFailed) and failed.status_code == 500
    assert "leaky-value-321" not in failed.error and "***" in failed.error
    assert "leaky-value-321" not in repr(failed.result)


async def test_assert_returns_names_every_missing_path(pool):
    code = "def main():\n    return {'a': {'b': 1}}\n"
    failed = (await run(command("python", config={"code": code}, assert_returns=["a.b", "a.c", "z"]),
                        make_ports(pool))).last()
    assert isinstance(failed, ActionFailed)
    assert failed.error == "assert.returns failed: the result has no a.c, z"
    assert failed.result == {"a": {"b": 1}}


async def test_non_serialisable_result_fails():
    cmd = command("save", phase="save", result={"s": {1, 2}})
    failed = (await run(cmd, make_ports())).last()
    assert isinstance(failed, ActionFailed) and failed.error == "result is not JSON-serialisable: set at result['s']"


async def test_event_and_variable_saves_see_result_this_and_context(pool):
    code = "def main():\n    return {'color': 'teal', 'n': 2}\n"
    save = save_spec(storage="event", data={"c": "{{ result.color }}", "n": "{{ this.data.n }}",
                                            "d": "{{ data.color }}", "who": "{{ workload.who }}",
                                            "status": "{{ this.status }}"})
    cmd = command("python", config={"code": code}, save=save, context={"workload": {"who": "me"}, "execution_id": "e"})
    done = (await run(cmd, make_ports(pool))).last()
    assert isinstance(done, ActionCompleted), done
    assert done.saved == {"c": "teal", "n": 2, "d": "teal", "who": "me", "status": "COMPLETED"}
    assert done.result == {"color": "teal", "n": 2}
    save = save_spec(storage="variable", name="favourite", data="{{ result }}")
    done = (await run(command("python", config={"code": code}, save=save), make_ports(pool))).last()
    assert done.variables == {"favourite": {"color": "teal", "n": 2}}


async def test_save_phase_skips_the_action_and_saves_the_given_result():
    save = save_spec(storage="event", data={"r": "{{ result }}"})
    cmd = command("python", phase="save", result=None, save=save, config={"code": "this would fail"})
    done = (await run(cmd, make_ports())).last()
    assert isinstance(done, ActionCompleted) and done.saved == {"r": None} and done.result is None


async def test_save_template_error_and_python_save_failure_fail_the_step(pool):
    save = save_spec(storage="event", data={"x": "{{ result.nope }}"})
    failed = (await run(command("save", phase="save", result={"a": 1}, save=save), make_ports())).last()
    assert isinstance(failed, ActionFailed) and "save (event)" in failed.error and "nope" in failed.error
    save = save_spec(storage="python", data="{{ result }}", code="def main(data):\n    raise RuntimeError('disk full')\n")
    failed = (await run(command("save", phase="save", result={"a": 1}, save=save), make_ports(pool))).last()
    assert failed.error == "python save failed: RuntimeError: disk full"
    save = save_spec(storage="python", data="{{ result }}", code="def main(data):\n    print('got', data)\n    return 1\n")
    done = (await run(command("save", phase="save", result={"a": 1}, save=save), make_ports(pool))).last()
    assert isinstance(done, ActionCompleted) and "got {'a': 1}" in done.log


async def test_save_step_type_uses_its_own_keys():
    cmd = command("save", config={"storage": "variable", "name": "v"}, data={"x": "{{ result }}"})
    done = (await run(cmd, make_ports())).last()
    assert isinstance(done, ActionCompleted), done
    assert done.variables == {"v": {"x": None}}


async def test_playbook_starts_the_child_and_reports_no_completion():
    catalog = MemoryCatalog()
    doc = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "child", "path": "lib/child"},
           "workflow": [{"step": "start"}]}
    await catalog.register("yaml v1", doc, "lib/child")
    await catalog.register("yaml v2", {**doc, "workload": {"v": 2}}, "lib/child")
    cmd = command("playbook", config={"path": "lib/child", "version": 1, "return_step": "multiply"},
                  data={"x": 7}, step="call_child", lease_seconds=12)
    emitted = await run(cmd, make_ports(catalog=catalog))
    assert emitted.kinds() == ["action_started", "start", "child_started"]
    start, child = emitted[1], emitted[2]
    assert isinstance(start, StartExecution) and isinstance(child, ChildStarted)
    assert start.execution_id == child.child_execution_id == child_execution_id(cmd.command_id)
    assert start.playbook == doc and start.path == "lib/child" and start.version == 1
    assert start.payload == {"x": 7} and start.return_step == "multiply" and start.lease_seconds == 12
    assert (start.parent_execution_id, start.parent_command_id, start.parent_step) == ("exec-1", cmd.command_id, "call_child")
    assert child.execution_id == "exec-1" and child.command_id == cmd.command_id
    # Deterministic: a redelivered command starts the same child; another attempt a different one.
    assert child_execution_id(cmd.command_id) == child_execution_id(cmd.command_id)
    assert child_execution_id("exec-1:call_child:1:2") != start.execution_id


async def test_playbook_latest_version_and_missing_child():
    catalog = MemoryCatalog()
    await catalog.register("v1", {"v": 1}, "lib/child")
    await catalog.register("v2", {"v": 2}, "lib/child")
    emitted = await run(command("playbook", config={"path": "lib/child"}), make_ports(catalog=catalog))
    assert emitted[1].version == 2 and emitted[1].playbook == {"v": 2} and emitted[1].return_step is None
    failed = (await run(command("playbook", config={"path": "lib/none"}), make_ports(catalog=catalog))).last()
    assert isinstance(failed, ActionFailed) and failed.error == "playbook 'lib/none' not found in the catalog"


async def test_secrets_step_checks_names_and_never_returns_values():
    creds = {"db_pw": ("generic", {"value": "hunter2-hunter2"})}
    env = {"NOETL_SECRET_API_KEY": API_KEY}
    done = (await run(command("secrets", config={"names": ["API_KEY", "db_pw"]}), make_ports(creds=creds, env=env))).last()
    assert done.result == {"API_KEY": "***", "db_pw": "***"}
    failed = (await run(command("secrets", config={"name": "GONE"}), make_ports())).last()
    assert isinstance(failed, ActionFailed) and "GONE" in failed.error and "NOETL_SECRET_GONE" in failed.error


async def test_unknown_type_and_missing_pool_are_clear_errors():
    failed = (await run(command("teleport"), make_ports())).last()
    assert failed.error.startswith("unknown action type 'teleport'")
    failed = (await run(command("python", config={"code": "def main():\n    return 1\n"}), make_ports())).last()
    assert "no python pool" in failed.error


async def test_execute_never_raises_even_when_emit_fails_on_the_result(pool):  # noqa: D103
    class Picky(Emitted):
        async def __call__(self, message):
            if isinstance(message, ActionCompleted):
                raise ValueError("message too large")
            self.append(message)
    ports = dataclasses.replace(make_ports(pool, emit=Picky()), announce_after=30.0)
    await execute(command("python", config={"code": "def main():\n    return 1\n"}), ports)
    assert ports.emit.kinds() == ["action_failed"]          # a quick attempt reports once, with `started`
    assert "message too large" in ports.emit.last().error and ports.emit.last().started is not None


async def test_cancellation_propagates_and_stops_heartbeats(pool):
    ports = make_ports(pool)
    task = asyncio.create_task(execute(command("python", lease_seconds=0.3,
                                               config={"code": "import time\ndef main():\n    time.sleep(30)\n"}),
                                       ports))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    count = len(ports.emit)
    await asyncio.sleep(0.4)
    assert len(ports.emit) == count      # no heartbeat after the end
    ok = await pool.run("def main():\n    return 1\n", {}, 10)   # the pool's slot was freed
    assert ok.result == 1


async def test_the_master_key_is_never_a_playbook_secret(pool):
    ports = dataclasses.replace(make_ports(pool), env={"NOETL_SECRET_KEY": "master-key-value"})
    cmd = command("python", data={"k": "{{ secret.KEY }}"}, deferred=["data.k"], context={},
                  config={"code": "def main(k):\n    return k\n"})
    emitted = await run(cmd, ports)
    assert emitted.last().kind == "action_failed" and "master-key-value" not in repr(list(emitted))


# --- captured output per attempt (issue 10, worker side) ----------------------------------------------
async def test_output_is_bounded_by_the_setting_keeping_its_start_and_end():
    from noetl_runtime.settings import StepSettings
    settings = StepSettings(log_max_bytes=4096)
    code = "def main():\n    print('FIRST')\n    for i in range(100000):\n        print(i)\n    print('LAST')\n"
    with PythonPool(1, settings=settings) as small:
        done = (await run(command("python", config={"code": code}),
                          dataclasses.replace(make_ports(small), step_settings=settings))).last()
    assert isinstance(done, ActionCompleted)
    assert done.log.startswith("FIRST\n0\n1\n") and done.log.endswith("99999\nLAST\n")
    assert "bytes dropped" in done.log and len(done.log.encode()) < 4096 + 200


async def test_a_failure_outside_the_step_code_logs_its_traceback():
    failed = (await run(command("http", config={"endpoint": "http://[::1", "method": "GET"}), make_ports())).last()
    assert isinstance(failed, ActionFailed) and failed.error.startswith("InvalidURL")
    assert failed.log.startswith("Traceback (most recent call last)") and "InvalidURL" in failed.log


async def test_step_limits_come_from_the_steps_config(pool):
    cmd = command("python", config={"code": "def main():\n    return len(bytearray(300 << 20))\n",
                                    "limits": {"memory_mb": 128}})
    failed = (await run(cmd, make_ports(pool))).last()
    assert isinstance(failed, ActionFailed) and failed.error == "MemoryError"
    cmd = command("python", config={"code": "def main():\n    return 1\n", "limits": {"memory_mb": 10 ** 7}})
    failed = (await run(cmd, make_ports(pool))).last()
    assert isinstance(failed, ActionFailed) and "above the maximum" in failed.error


async def test_every_fact_carries_the_commands_token_back(pool):
    """Forged facts (docs/security.md): the fold drops a fact without its attempt's token, so the worker
    echoes the command's token on each: start, heartbeats, completion, failure, and a child's start (whose
    own StartExecution gets a fresh random key and the parent's token for its ChildFinished)."""
    token = "t0ken-" + uuid.uuid4().hex
    slow = command("python", lease_seconds=0.6,
                   config={"code": "import time\ndef main():\n    time.sleep(0.8)\n    return 1\n"}
                   ).model_copy(update={"token": token})
    emitted = await run(slow, dataclasses.replace(make_ports(pool), announce_after=0.01))
    assert {"action_started", "heartbeat", "action_completed"} <= set(emitted.kinds())
    assert [m.token for m in emitted] == [token] * len(emitted)
    failing = command("python", config={"code": "def main():\n    raise ValueError(1)\n"}
                      ).model_copy(update={"token": token})
    failed = (await run(failing, make_ports(pool))).last()
    assert isinstance(failed, ActionFailed) and failed.token == token

    catalog = MemoryCatalog()
    await catalog.register("v1", {"v": 1}, "lib/child")
    child_cmd = command("playbook", config={"path": "lib/child"}).model_copy(update={"token": token})
    first = await run(child_cmd, make_ports(catalog=catalog))
    start, started = first[1], first[2]
    assert isinstance(start, StartExecution) and isinstance(started, ChildStarted)
    assert started.token == token and start.parent_token == token
    again = (await run(child_cmd, make_ports(catalog=catalog)))[1]
    assert start.fact_key and again.fact_key and len(start.fact_key) >= 43 and start.fact_key != again.fact_key
