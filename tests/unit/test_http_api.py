"""The HTTP API of `noetl server` (embedded mode), driven like a client drives it: a real `noetl server`
subprocess on a free port with its own SQLite store under tmp, real HTTP with httpx. Nothing is mocked.

Covers the NoETL-compatible shapes (reference §13), the error answers (400 with every located error, 404,
422), that credential data never comes back, cancel, context rendering, pagination and filters.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from noetl_common.dsl import load_playbook
from support import bearer, free_port, local_admin_token

ROOT = Path(__file__).resolve().parents[2]
NOETL = Path(sys.executable).with_name("noetl")
SECRET = "pw-HTTP-9q2Wz-never-in-a-response"

HELLO = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: api_hello, path: tests/api_hello}
    workload: {name: World}
    workflow:
      - step: start
        next: [{step: greet, data: {name: "{{ workload.name }}"}}]
      - step: greet
        type: python
        code: |
          def main(name):
              return {"greeting": f"Hello, {name}!"}
        next: [{step: end}]
      - step: end
        result: {greeting: "{{ greet.greeting }}"}
    """)

SLOW = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: api_slow, path: tests/api_slow}
    workload: {seconds: 5}
    workflow:
      - step: start
        next: [{step: nap}]
      - step: nap
        type: python
        data: {seconds: "{{ workload.seconds }}"}
        code: |
          import time
          def main(seconds):
              time.sleep(seconds)
              return {"slept": seconds}
        next: [{step: end}]
      - step: end
        result: {slept: "{{ nap.slept }}"}
    """)

INVALID = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: api_invalid, path: tests/api_invalid}
    workflow:
      - step: start
        next: [{step: nowhere}]
      - step: work
        type: no_such_type
        next: [{step: end}]
      - step: end
    """)


# ---------------------------------------------------------------------------------------------- the server

def server_env() -> dict[str, str]:
    """The test's environment less secrets; the services' source folders on PYTHONPATH in case the
    installed package predates them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOETL_SECRET_")}
    extra = [str(ROOT / "services" / name) for name in ("ingest", "query", "render")]
    env["PYTHONPATH"] = os.pathsep.join(extra + [p for p in [env.get("PYTHONPATH")] if p])
    return env


class Server:
    """`noetl server --port P --store S` in its own process group, with its log in a file."""
    stores: dict[str, Path] = {}   # url -> store of every server started (its admin.token is beside it)

    def __init__(self, store: Path, port: int | None = None) -> None:
        self.store, self.port = store, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = store.with_suffix(".log")
        self.popen: subprocess.Popen[bytes] | None = None
        Server.stores[self.url] = store

    @property
    def auth(self) -> dict[str, str]:
        """The Authorization header with the admin token the server created on its first start."""
        return bearer(local_admin_token(self.store))

    def start(self, timeout: float = 30) -> "Server":
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen([str(NOETL), "server", "--port", str(self.port), "--store", str(self.store)],
                                          stdout=log, stderr=log, env=server_env(), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.popen.poll() is None, f"noetl server exited:\n{self.log.read_text()}"
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"noetl server not ready in {timeout}s:\n{self.log.read_text()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole group (python children too), as a crash would take them all."""
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
            self.popen.wait(15)

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("api") / "noetl.db").start()
    yield srv
    srv.kill(signal.SIGTERM)
    assert SECRET not in srv.logs()


@pytest.fixture
def api(server: Server):
    with httpx.Client(base_url=server.url, timeout=30, headers=server.auth) as client:
        yield client


def until(condition: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return value


def register(api: httpx.Client, text: str) -> dict[str, Any]:
    response = api.post("/api/catalog/register", json={"content": text})
    assert response.status_code == 200, response.text
    return response.json()


def start(api: httpx.Client, path: str, **body: Any) -> str:
    response = api.post("/api/executions/run", json={"path": path, **body})
    assert response.status_code == 200, response.text
    return response.json()["execution_id"]


def finished(api: httpx.Client, execution_id: str, timeout: float = 20) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        r = api.get(f"/api/executions/{execution_id}")
        return r.json() if r.status_code == 200 and r.json()["status"] in ("COMPLETED", "FAILED", "CANCELLED") \
            else None
    return until(done, timeout, f"execution {execution_id} to finish")


# ---------------------------------------------------------------------------------------------- tests
def test_ops_endpoints(api: httpx.Client) -> None:
    assert api.get("/health").json() == {"status": "ok"}
    assert api.get("/ready").json() == {"status": "ready"}
    metrics = api.get("/metrics")
    assert metrics.status_code == 200 and "noetl_http_requests_total" in metrics.text
    assert "noetl_executions_active" in metrics.text


def test_register_run_and_read_hello_world(api: httpx.Client) -> None:
    entry = register(api, HELLO)
    assert entry["status"] == "success" and entry["path"] == "tests/api_hello" and entry["kind"] == "Playbook"
    assert isinstance(entry["version"], int)

    response = api.post("/api/executions/run", json={"path": "tests/api_hello", "parameters": {"name": "Ada"}})
    assert response.status_code == 200
    started = response.json()
    assert started["status"] == "running" and started["id"] == started["execution_id"]
    eid = started["execution_id"]

    detail = finished(api, eid)
    assert detail["status"] == "COMPLETED" and detail["progress"] == 100
    assert detail["result"] == {"greeting": "Hello, Ada!"}
    assert detail["path"] == "tests/api_hello" and detail["playbook_id"] == "tests/api_hello"
    assert detail["steps"]["greet"] == {"status": "COMPLETED", "result": {"greeting": "Hello, Ada!"},
                                        "attempts": 1, "visits": 1, "error": None}
    types = [e["event_type"] for e in detail["events"]]
    assert types[0] == "execution_start" and types[-1] == "execution_complete"
    assert [e["seq"] for e in detail["events"]] == list(range(len(types)))

    assert api.get(f"/api/execution/data/{eid}").json()["events"] == detail["events"]
    assert api.get(f"/api/executions/{eid}/events").json()["events"] == detail["events"]
    tail = api.get(f"/api/executions/{eid}/events", params={"after_seq": len(types) - 2}).json()["events"]
    assert [e["seq"] for e in tail] == [len(types) - 1]
    light = api.get(f"/api/executions/{eid}", params={"events": "false"}).json()
    assert light["status"] == "COMPLETED" and "events" not in light

    summary = api.get(f"/api/events/summary/{eid}").json()
    assert summary["status"] == "ok"
    assert summary["summary"]["counts"]["step_completed"] == 3 and summary["summary"]["errors"] == []

    # the alias, with NoETL's field names
    alias = api.post("/api/execute", json={"playbook_id": "tests/api_hello", "version": "latest",
                                           "input_payload": {"name": "Bo"}})
    assert alias.status_code == 200
    assert finished(api, alias.json()["execution_id"])["result"] == {"greeting": "Hello, Bo!"}

    # the catalog, read side
    entries = api.get("/api/catalog/list", params={"include_content": "true"}).json()["entries"]
    assert any(e["path"] == "tests/api_hello" and e["payload"]["metadata"]["name"] == "api_hello" for e in entries)
    one = api.get("/api/catalog/playbook", params={"playbook_id": "tests/api_hello"}).json()
    assert one["version"] == max(e["version"] for e in entries if e["path"] == "tests/api_hello")
    assert one["content"] == HELLO
    pinned = api.get("/api/catalog/playbook", params={"playbook_id": "tests/api_hello", "version": entry["version"]})
    assert pinned.status_code == 200 and pinned.json()["version"] == entry["version"]


def test_invalid_playbook_is_400_with_every_located_error(api: httpx.Client) -> None:
    _, problems = load_playbook(INVALID)
    expected = [{"path": p.path, "line": p.line, "message": p.message} for p in problems if p.severity == "error"]
    assert len(expected) >= 2
    response = api.post("/api/catalog/register", json={"content": INVALID})
    assert response.status_code == 400
    body = response.json()
    assert body["errors"] == expected and f"{len(expected)} error(s)" in body["detail"]
    assert all(e["line"] for e in body["errors"])
    # base64 content goes through the same validation
    import base64
    b64 = api.post("/api/catalog/register", json={"content_base64": base64.b64encode(INVALID.encode()).decode()})
    assert b64.status_code == 400 and b64.json()["errors"] == expected
    # not YAML at all
    broken = api.post("/api/catalog/register", json={"content": "workflow: [unclosed"})
    assert broken.status_code == 400 and broken.json()["errors"]


def test_unknown_things_are_404(api: httpx.Client) -> None:
    r = api.post("/api/executions/run", json={"path": "tests/no_such_playbook"})
    assert r.status_code == 404 and "not in the catalog" in r.json()["detail"]
    register(api, HELLO)
    assert api.post("/api/executions/run", json={"path": "tests/api_hello", "version": 9999}).status_code == 404
    assert api.get("/api/catalog/playbook", params={"playbook_id": "tests/nope"}).status_code == 404
    for path in ("/api/executions/nope", "/api/executions/nope/events", "/api/execution/data/nope",
                 "/api/events/summary/nope"):
        assert api.get(path).status_code == 404, path
    assert api.post("/api/context/render", json={"execution_id": "nope", "template": "x"}).status_code == 404


def test_bad_input_is_422(api: httpx.Client) -> None:
    bad_json = api.post("/api/executions/run", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 422 and bad_json.json()["detail"]
    assert api.post("/api/executions/run", json={}).status_code == 422                       # no playbook named
    assert api.post("/api/executions/run", json={"path": "x", "parameters": [1]}).status_code == 422
    assert api.post("/api/executions/run", json={"path": "x", "version": "v-two"}).status_code == 422
    assert api.post("/api/catalog/register", json={}).status_code == 422                     # no content
    assert api.post("/api/catalog/register", json={"content_base64": "%%%"}).status_code == 400
    assert api.post("/api/credentials", json={"name": "x"}).status_code == 422               # no data
    assert api.post("/api/credentials", json={"name": "a b", "data": {}}).status_code == 422
    echo = api.post("/api/credentials", json={"name": "x", "data": SECRET})   # data of the wrong shape
    assert echo.status_code == 422 and SECRET not in echo.text                  # is not echoed back
    assert api.post("/api/context/render", json={"template": "x"}).status_code == 422
    assert api.get("/api/catalog/playbook", params={"playbook_id": "x", "version": "abc"}).status_code == 422
    # posted facts are decoded by the codec
    assert api.post("/api/events", json={"kind": "action_completed"}).status_code == 422
    assert api.post("/api/events", json={"kind": "nonsense", "execution_id": "e"}).status_code == 422
    assert api.post("/api/events", json=[1, 2]).status_code == 422
    refused = api.post("/api/events", json={"kind": "start", "execution_id": "e"})
    assert refused.status_code == 400 and "/api/executions/run" in refused.json()["detail"]
    ok = api.post("/api/events", json={"kind": "heartbeat", "execution_id": "e", "command_id": "e:x:1:1"})
    assert ok.status_code == 202 and ok.json()["kind"] == "heartbeat"


def test_credentials_never_return_their_data(api: httpx.Client) -> None:
    answers = []
    put = api.post("/api/credentials", json={"name": "api_pg", "type": "postgres", "description": "test db",
                                             "data": {"user": "u", "password": SECRET}})
    answers.append(put)
    assert put.status_code == 200 and put.json()["name"] == "api_pg" and put.json()["type"] == "postgres"
    answers.append(again := api.post("/api/credentials", json={"name": "api_pg", "credential_type": "postgres",
                                                               "data": {"password": SECRET}}))
    assert again.status_code == 200                                                          # upsert
    answers.append(listing := api.get("/api/credentials"))
    assert "api_pg" in [c["name"] for c in listing.json()["items"]]
    answers.append(filtered := api.get("/api/credentials", params={"type": "bearer"}))
    assert "api_pg" not in [c["name"] for c in filtered.json()["items"]]
    answers.append(one := api.get("/api/credentials/api_pg"))
    assert one.status_code == 200 and one.json()["type"] == "postgres" and "data" not in one.json()
    answers.append(refused := api.get("/api/credentials/api_pg", params={"include_data": "true"}))
    assert refused.status_code == 403
    for answer in answers:
        assert SECRET not in answer.text and '"data"' not in answer.text
    assert api.delete("/api/credentials/api_pg").json() == {"status": "deleted", "name": "api_pg"}
    assert api.delete("/api/credentials/api_pg").status_code == 404
    assert api.get("/api/credentials/api_pg").status_code == 404


def test_cancel_a_running_execution(api: httpx.Client) -> None:
    register(api, SLOW)
    eid = start(api, "tests/api_slow", parameters={"seconds": 30})
    until(lambda: api.get(f"/api/executions/{eid}").json().get("steps", {}).get("nap"), what="nap to start")
    response = api.post(f"/api/executions/{eid}/cancel", json={"reason": "enough"})
    assert response.status_code == 202 and response.json()["execution_id"] == eid
    detail = finished(api, eid, timeout=10)
    assert detail["status"] == "CANCELLED" and detail["error"] == "enough"
    assert detail["steps"]["nap"]["status"] == "CANCELLED"
    # cancelling again (or an unknown id) is harmless
    assert api.post(f"/api/executions/{eid}/cancel").status_code == 202
    assert api.get(f"/api/executions/{eid}").json()["status"] == "CANCELLED"


def test_render_against_an_execution(api: httpx.Client) -> None:
    register(api, HELLO)
    eid = start(api, "tests/api_hello", parameters={"name": "Cy"})
    finished(api, eid)
    r = api.post("/api/context/render", json={
        "execution_id": eid, "extra_context": {"punct": "!"},
        "template": {"text": "{{ greet.greeting }} ({{ workload.name }}){{ punct }}", "id": "{{ execution_id }}",
                     "n": "{{ workload.name | length }}"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok"
    assert body["rendered"] == {"text": "Hello, Cy! (Cy)!", "id": eid, "n": 2}
    assert {"workload", "execution_id", "greet", "vars", "punct"} <= set(body["context_keys"])
    strict = api.post("/api/context/render", json={"execution_id": eid, "template": "{{ nope.x }}"})
    assert strict.status_code == 400 and "nope" in strict.json()["detail"]
    lenient = api.post("/api/context/render", json={"execution_id": eid, "template": "{{ nope.x }}", "strict": False})
    assert lenient.status_code == 200 and lenient.json()["rendered"] == "{{ nope.x }}"


def test_list_pagination_and_filters(api: httpx.Client) -> None:
    text = HELLO.replace("api_hello", "api_list")
    register(api, text)
    before = time.time()
    ids = [start(api, "tests/api_list", parameters={"name": f"n{i}"}) for i in range(3)]
    for eid in ids:
        finished(api, eid)
    everything = api.get("/api/executions", params={"path": "tests/api_list", "limit": 100})
    assert everything.status_code == 200 and everything.headers["x-total-count"] == "3"
    assert sorted(e["id"] for e in everything.json()) == sorted(ids)
    row = everything.json()[0]
    assert {"id", "playbook_id", "status", "start_time", "end_time", "progress", "result", "error"} <= set(row)

    first = api.get("/api/executions", params={"path": "tests/api_list", "limit": 2}).json()
    rest = api.get("/api/executions", params={"path": "tests/api_list", "limit": 2, "offset": 2}).json()
    assert len(first) == 2 and len(rest) == 1
    assert [e["id"] for e in first + rest] == [e["id"] for e in everything.json()]     # newest first, stable
    starts = [e["start_time"] for e in first + rest]
    assert starts == sorted(starts, reverse=True)

    completed = api.get("/api/executions", params={"path": "tests/api_list", "status": "completed"})
    assert completed.headers["x-total-count"] == "3"
    assert api.get("/api/executions", params={"path": "tests/api_list", "status": "FAILED"}).json() == []
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(before - 1)) + "Z"
    assert len(api.get("/api/executions", params={"path": "tests/api_list", "since": since}).json()) == 3
    future = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 3600)) + "Z"
    assert api.get("/api/executions", params={"path": "tests/api_list", "since": future}).json() == []
    assert len(api.get("/api/executions", params={"path": "tests/api_list", "until": future}).json()) == 3
    for bad in ({"status": "SLEEPING"}, {"limit": 0}, {"limit": 5000}, {"offset": -1}, {"since": "yesterday"}):
        assert api.get("/api/executions", params=bad).status_code == 422, bad


def test_one_server_per_store(server: Server) -> None:
    """A second server on the same store would resume (and run again) the first one's executions."""
    proc = subprocess.run([str(NOETL), "server", "--port", str(free_port()), "--store", str(server.store)],
                          capture_output=True, text=True, timeout=30, env=server_env())
    assert proc.returncode == 1 and "another noetl server is using the store" in proc.stderr
    taken = subprocess.run([str(NOETL), "server", "--port", str(server.port), "--store",
                            str(server.store.with_name("other.db"))],
                           capture_output=True, text=True, timeout=30, env=server_env())
    assert taken.returncode == 1 and "address already in use" in taken.stderr.lower()
    assert httpx.get(server.url + "/ready").status_code == 200
