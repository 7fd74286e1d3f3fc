"""Poison playbooks (issue 8) in the pure fold, the embedded runtime, `noetl run` and `noetl server`.

- an `end` step whose `result` renders `{{ workload.items }}` when the workload has no `items` key (Jinja then
  yields the dict's method): it used to reach the snapshot and kill the fold loop on `state.to_bytes()`;
- a python step with `data: {x: "{{ cycler }}"}` (a Jinja global that is a class): the same from the
  command's side;
- an http step with a header whose name holds a dot and a deferred value (`"X.Token": "{{ secret.TOKEN }}"`):
  `advance()` raised KeyError (the fold split deferred paths on dots, the worker did not).

The first two end FAILED with a message naming the template and what it produced; the third runs. Other
executions running at the same time complete, and the runtime keeps serving. The Kafka modes are covered in
tests/integration/test_broker.py and tests/integration/test_server_kafka.py.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from noetl_common.engine import advance
from noetl_common.messages import StartExecution
from noetl_common.simulate import Outcome, Simulation
from noetl_embedded.runtime import EmbeddedRuntime
from noetl_runtime.sqlite_store import SqliteStore

from test_cli import cli, report_of, write
from test_http_api import Server, finished, register
from test_worker_support import HttpFixture

TOKEN = "tok-dotted-7Hq2"

POISON_END = """
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: poison_end, path: tests/poison/end}
workload: {n: 1}
workflow:
  - step: start
    next: [{step: end}]
  - step: end
    result: {x: "{{ workload.items }}"}
"""
POISON_END_ERROR = ("step 'end' failed: result: `workload.items` is a method of the mapping, not a value (the "
                    "mapping has no key 'items') in template '{{ workload.items }}'")

POISON_CYCLER = """
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: poison_cycler, path: tests/poison/cycler}
workflow:
  - step: start
    next: [{step: s}]
  - step: s
    type: python
    data: {x: "{{ cycler }}"}
    code: |
      def main(x):
          return x
    next: [{step: end}]
  - step: end
"""
POISON_CYCLER_ERROR = ("step 's' failed: data.x: `cycler` is a class (Cycler), not a value in template "
                       "'{{ cycler }}'")

DOTTED_HEADER = """
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: dotted_header, path: tests/poison/dotted}
workload: {url: "http://127.0.0.1:1/unused"}
workflow:
  - step: start
    next: [{step: call}]
  - step: call
    type: http
    method: GET
    endpoint: "{{ workload.url }}"
    headers: {"X.Token": "{{ secret.TOKEN }}", "Plain": "p"}
    next: [{step: end}]
  - step: end
    result: {status: "{{ call.status_code }}"}
"""

GOOD = """
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: good, path: tests/poison/good}
workload: {x: 20}
workflow:
  - step: start
    next: [{step: work}]
  - step: work
    type: python
    data: {x: "{{ workload.x }}"}
    code: |
      import time
      def main(x):
          time.sleep(0.3)
          return {"y": x + 1}
    next: [{step: end}]
  - step: end
    result: {y: "{{ work.y }}"}
"""


def doc(text: str) -> dict[str, Any]:
    return yaml.safe_load(text)


def ok(command: Any) -> Outcome:
    return Outcome(result={"status_code": 200, "x": command.action.data.get("x")})


# ------------------------------------------------------------------------------------------ the pure fold
@pytest.mark.parametrize("text, error", [(POISON_END, POISON_END_ERROR), (POISON_CYCLER, POISON_CYCLER_ERROR)],
                         ids=["end_result_method", "python_data_class"])
def test_the_fold_fails_the_execution_naming_the_template(text: str, error: str) -> None:
    sim = Simulation(ok)
    sim.start(doc(text))
    sim.run()
    state = sim.state()
    assert state.status == "FAILED" and state.error == error
    assert [e.event_type for e in sim.events][-1] == "execution_failed"
    state.to_bytes()                                   # the failed state can be saved
    for command in sim.commands:
        command.model_dump_json()


def test_a_dotted_header_with_a_deferred_value_is_one_structured_path() -> None:
    t = advance(None, StartExecution(execution_id="e", time=1.0, playbook=doc(DOTTED_HEADER), path="p"))
    (command,) = t.commands
    assert command.action.deferred == [["config", "headers", "X.Token"]]
    assert command.action.config["headers"] == {"X.Token": "{{ secret.TOKEN }}", "Plain": "p"}


# ------------------------------------------------------------------------------------------ the embedded runtime
@pytest.fixture(scope="module")
def http() -> Any:
    server = HttpFixture()
    yield server
    server.close()


async def test_the_embedded_runtime_fails_poison_executions_and_keeps_serving(tmp_path: Path, http: Any,
                                                                              monkeypatch: Any) -> None:
    monkeypatch.setenv("NOETL_SECRET_TOKEN", TOKEN)
    runtime = EmbeddedRuntime(SqliteStore(tmp_path / "x.db"), python_processes=1)
    await runtime.start()
    try:
        def submit(text: str, payload: dict[str, Any] | None = None) -> str:
            playbook = doc(text)
            return runtime.submit(runtime.start_message(playbook, playbook["metadata"]["path"], None,
                                                        payload or {}, time.time()))
        good = submit(GOOD)                          # running while the poison ones arrive
        poison_end, poison_cycler = submit(POISON_END), submit(POISON_CYCLER)
        dotted = submit(DOTTED_HEADER, {"url": f"{http.url}/echo"})
        states = await asyncio.wait_for(asyncio.gather(*(runtime.wait(e) for e in (
            good, poison_end, poison_cycler, dotted))), 30)
        after = await asyncio.wait_for(runtime.wait(submit(GOOD, {"x": 1})), 30)   # and it still serves
        logs = {eid: await runtime.store.events(eid) for eid in (poison_end, poison_cycler)}
    finally:
        await runtime.stop()
        runtime.store.close()
    by_id = dict(zip((good, poison_end, poison_cycler, dotted), states))
    assert runtime.crashed is None
    assert by_id[good].status == "COMPLETED" and by_id[good].result == {"y": 21}
    assert (by_id[poison_end].status, by_id[poison_end].error) == ("FAILED", POISON_END_ERROR)
    assert (by_id[poison_cycler].status, by_id[poison_cycler].error) == ("FAILED", POISON_CYCLER_ERROR)
    assert by_id[dotted].status == "COMPLETED", by_id[dotted].error
    assert by_id[dotted].result == {"status": 200}
    assert http.calls[-1]["headers"]["x.token"] == TOKEN and http.calls[-1]["headers"]["plain"] == "p"
    assert after.status == "COMPLETED" and after.result == {"y": 2}
    for log in logs.values():                        # the stored log says it too
        assert log[-1].event_type == "execution_failed"


# ------------------------------------------------------------------------------------------ noetl run
@pytest.mark.parametrize("text, error", [(POISON_END, POISON_END_ERROR), (POISON_CYCLER, POISON_CYCLER_ERROR)],
                         ids=["end_result_method", "python_data_class"])
def test_noetl_run_reports_the_poison_template(tmp_path: Path, text: str, error: str) -> None:
    store = tmp_path / "x.db"
    code, report = report_of(cli("run", write(tmp_path, "poison", text), "--json", "--store", store, store=store))
    assert code == 1 and report["status"] == "FAILED" and report["error"] == error
    plain = cli("run", write(tmp_path, "poison", text), "--store", store, store=store)
    assert plain.returncode == 1
    assert error.split(": ")[-1].split(" in template")[0] in " ".join((plain.stdout + plain.stderr).split())


# ------------------------------------------------------------------------------------------ noetl server
def test_noetl_server_fails_poison_executions_and_stays_ready(tmp_path: Path, http: Any, monkeypatch: Any) -> None:
    import test_http_api

    environment = test_http_api.server_env
    monkeypatch.setattr(test_http_api, "server_env", lambda: {**environment(), "NOETL_SECRET_TOKEN": TOKEN})
    server = Server(tmp_path / "noetl.db")
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30, headers=server.auth) as api:
            for text in (POISON_END, POISON_CYCLER, DOTTED_HEADER, GOOD):
                register(api, text)

            def run(path: str, parameters: dict[str, Any] | None = None) -> str:
                r = api.post("/api/executions/run", json={"path": path, "parameters": parameters or {}})
                assert r.status_code == 200, r.text
                return r.json()["execution_id"]
            ids = {"good": run("tests/poison/good"), "end": run("tests/poison/end"),
                   "cycler": run("tests/poison/cycler"),
                   "dotted": run("tests/poison/dotted", {"url": f"{http.url}/echo"})}
            results = {name: finished(api, eid, timeout=30) for name, eid in ids.items()}
            assert api.get("/ready").status_code == 200
            later = finished(api, run("tests/poison/good", {"x": 2}), timeout=30)
            assert api.get("/ready").status_code == 200 and api.get("/health").status_code == 200
            listed = api.get("/api/executions", params={"status": "FAILED"}).json()
        assert server.popen is not None and server.popen.poll() is None   # never restarted, never died
    finally:
        server.kill()
    assert results["good"]["status"] == "COMPLETED" and results["good"]["result"] == {"y": 21}
    assert (results["end"]["status"], results["end"]["error"]) == ("FAILED", POISON_END_ERROR)
    assert (results["cycler"]["status"], results["cycler"]["error"]) == ("FAILED", POISON_CYCLER_ERROR)
    assert results["dotted"]["status"] == "COMPLETED" and results["dotted"]["result"] == {"status": 200}
    assert http.calls[-1]["headers"]["x.token"] == TOKEN
    assert later["status"] == "COMPLETED" and later["result"] == {"y": 3}
    assert {e["execution_id"] for e in listed} == {ids["end"], ids["cycler"]}


# ------------------------------------------------------------------------------------------ hypothesis, for real
def test_hostile_playbooks_through_the_real_embedded_runtime(tmp_path: Path) -> None:
    """The property test's playbooks (tests/hostile.py) through the real runtime, its real worker and python
    pool: every execution ends (its worker answers every command), the canary next to them completes, the
    runtime never dies, and no input needs the batch fold's error path."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from hostile import CANARY, playbooks

    loop = asyncio.new_event_loop()
    runtime = EmbeddedRuntime(SqliteStore(tmp_path / "x.db"), python_processes=1)
    loop.run_until_complete(runtime.start())
    problems: list[str] = []
    import noetl_embedded.runtime as embedded
    log_problems = embedded._log_problems

    def spy(out: Any) -> None:
        problems.extend(f"{f.execution_id}: {f.reason}" for f in out.failures)
        log_problems(out)

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
    @given(documents=st.lists(playbooks("h"), min_size=1, max_size=3))
    def check(documents: list[dict[str, Any]]) -> None:
        async def run() -> None:
            ids = [runtime.submit(runtime.start_message(d, "t/h", None, {}, time.time())) for d in documents]
            canary = runtime.submit(runtime.start_message(CANARY, "t/canary", None, {}, time.time()))
            states = await asyncio.wait_for(asyncio.gather(*(runtime.wait(e) for e in [*ids, canary])), 60)
            assert all(s.terminal for s in states)
            assert states[-1].status == "COMPLETED" and states[-1].result == {"y": 21}
        loop.run_until_complete(run())
        assert runtime.crashed is None and problems == []

    embedded._log_problems = spy
    try:
        check()
    finally:
        embedded._log_problems = log_problems
        loop.run_until_complete(runtime.stop())
        runtime.store.close()
        loop.close()


async def test_an_unreadable_snapshot_is_quarantined_at_resume_and_the_read_model_says_so(tmp_path: Path) -> None:
    """A snapshot the embedded runtime cannot read (corrupt, or from an incompatible version) used to stop
    `noetl server` from starting at all. Now its execution is quarantined at resume, the snapshot lands in the
    dead_letters table, the read model says `quarantined`, and everything else runs."""
    from noetl_query.sqlite_reads import SqliteReadModel

    path = tmp_path / "x.db"
    store = SqliteStore(path)
    store.commit_batch_sync([], {"q": b'{"execution_id": "q", "status": "RUNNING", "seq": 0, "path": "t/q", '
                                      b'"started": 1700000000.0, "steps": 7}'})
    store.close()
    runtime = EmbeddedRuntime(SqliteStore(path), python_processes=1)
    await runtime.start()
    try:
        quarantined = await asyncio.wait_for(runtime.wait("q"), 5)
        playbook = doc(GOOD)
        good = await asyncio.wait_for(runtime.wait(runtime.submit(runtime.start_message(
            playbook, "t/good", None, {}, time.time()))), 30)
        summary = await SqliteReadModel(runtime.store).execution("q")
        letters = runtime.store.dead_letters()
        states = await runtime.store.load_states()
    finally:
        await runtime.stop()
        runtime.store.close()
    assert quarantined.status == "FAILED" and quarantined.error.startswith("quarantined: its state cannot be resumed")
    assert summary is not None and summary["status"] == "FAILED" and summary["quarantined"] is True
    assert summary["error"] == quarantined.error
    assert [(eid, raw[:16]) for eid, raw, _reason in letters] == [("q", b'{"execution_id":')]
    assert "q" not in states                              # terminal now: the next start does not resume it
    assert good.status == "COMPLETED" and runtime.crashed is None


def test_submit_refuses_a_message_no_reader_takes_back(tmp_path: Path) -> None:
    """A start whose payload the codec writes but cannot read back (an int of 5,000 digits) is refused at
    submission: accepted, it would be dead-lettered and its caller left waiting for ever."""
    from noetl_common.codec import DecodeError

    runtime = EmbeddedRuntime(SqliteStore(tmp_path / "x.db"))
    try:
        with pytest.raises(DecodeError, match="number out of range"):
            runtime.submit(runtime.start_message(doc(GOOD), "t/good", None, {"x": 10 ** 5000}, time.time()))
        assert runtime.bus.backlog(runtime.topics.requests) == 0
    finally:
        runtime.store.close()
