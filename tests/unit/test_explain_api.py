"""GET /api/executions/{id}/explain and `noetl status ID --server URL` against a real `noetl server`
subprocess (embedded mode), on one execution that is, at the same time: running a step on a worker (with
heartbeats), waiting for a step's retry timer, joining, iterating (an item running, one waiting to retry) and
waiting for a child execution. The steps talk to a local HTTP server that answers `/slow` only after a long
while and refuses `/down` (a port nobody listens on), so nothing depends on the Python pool's size.
"""
from __future__ import annotations

import http.server
import json
import signal
import subprocess
import textwrap
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import free_port, local_admin_token
from test_http_api import NOETL, Server, register, server_env, start, until

DOWN = f"http://127.0.0.1:{free_port()}/down"   # nothing listens there: connection refused at once

PARENT = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: explain_parent, path: tests/explain_parent}
    workload: {slow: "", down: ""}
    workflow:
      - step: start
        next: [{step: nap}, {step: quick}, {step: flaky}, {step: each}, {step: call}]
      - step: nap
        type: http
        endpoint: "{{ workload.slow }}"
        timeout: 120
        next: [{step: merge}]
      - step: quick
        next: [{step: merge}]
      - step: merge
        next: [{step: end}]
      - step: flaky
        type: http
        endpoint: "{{ workload.down }}"
        retry: {max_attempts: 5, initial_delay: 300}
        next: [{step: end}]
      - step: each
        type: iterator
        collection: [0, 1]
        element: n
        mode: async
        concurrency: 2
        task:
          type: http
          endpoint: "{{ workload.down if n == 0 else workload.slow }}"
          timeout: 120
          retry: {max_attempts: 3, initial_delay: 300}
        next: [{step: end}]
      - step: call
        type: playbook
        path: tests/explain_child
        data: {slow: "{{ workload.slow }}"}
        next: [{step: end}]
      - step: end
    """)
CHILD = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: explain_child, path: tests/explain_child}
    workload: {slow: ""}
    workflow:
      - step: start
        next: [{step: wait}]
      - step: wait
        type: http
        endpoint: "{{ workload.slow }}"
        timeout: 120
        next: [{step: end}]
      - step: end
    """)


class _Slow(http.server.BaseHTTPRequestHandler):
    release: threading.Event   # one per server (slow_url): a released server answers at once

    def do_GET(self) -> None:   # noqa: N802 - http.server's name
        self.release.wait(120)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def slow_url():
    handler = type("Slow", (_Slow,), {"release": threading.Event()})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/slow"
    handler.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("explain") / "noetl.db").start()
    yield srv
    srv.kill(signal.SIGTERM)


@pytest.fixture
def api(server: Server):
    with httpx.Client(base_url=server.url, timeout=30, headers=server.auth) as client:
        yield client


def noetl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = server_env()
    url = args[args.index("--server") + 1] if "--server" in args else None
    if url in Server.stores:   # the admin token the server wrote beside its store
        env["NOETL_API_TOKEN"] = local_admin_token(Server.stores[url])
    proc = subprocess.run([str(NOETL), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return proc


def explained(api: httpx.Client, execution_id: str) -> dict[str, Any]:
    response = api.get(f"/api/executions/{execution_id}/explain")
    assert response.status_code == 200, response.text
    return response.json()


def test_a_busy_execution_is_explained_by_the_api_and_by_noetl_status(api: httpx.Client, server: Server,
                                                                        slow_url: str) -> None:
    register(api, CHILD)
    register(api, PARENT)
    execution_id = start(api, "tests/explain_parent", parameters={"slow": slow_url, "down": DOWN})

    def settled() -> dict[str, Any] | None:
        body = explained(api, execution_id)
        kinds = [(i["kind"], i["step"], i.get("index")) for i in body["items"]]
        wanted = {("attempt", "nap", None), ("retry", "flaky", None), ("iterator", "each", None),
                  ("retry", "each", 0), ("attempt", "each", 1), ("child", "call", None), ("pending", "merge", None)}
        return body if wanted <= set(kinds) and "last heartbeat" in body["text"] else None

    body = until(settled, 40, "every kind of wait, and a heartbeat of `nap`")
    assert body["execution_id"] == execution_id and body["status"] == "RUNNING"
    items = {(i["kind"], i["step"], i.get("index")): i for i in body["items"]}
    nap = items[("attempt", "nap", None)]
    assert nap["fields"]["worker_id"].startswith("embedded-")
    assert nap["text"].startswith(f"step `nap` attempt 1 on worker `{nap['fields']['worker_id']}`, started ")
    assert "(step timeout 120 s + grace)" in nap["text"]
    assert nap["fields"]["lease_until"]["epoch"] > body["now"]
    flaky = items[("retry", "flaky", None)]
    assert flaky["fields"]["attempt"] == 2 and flaky["fields"]["max_attempts"] == 5
    assert flaky["text"].startswith("retry of `flaky` due at ") and flaky["text"].endswith("(attempt 2 of 5)")
    assert items[("iterator", "each", None)]["text"] == (
        "iterator `each`: 0 of 2 done, 1 running, 1 waiting to retry, concurrency 2")
    child = items[("child", "call", None)]
    assert child["text"] == f"step `call` waits for child execution `{child['fields']['child_execution_id'][:8]}…` " \
                            "(running), no timeout"
    assert items[("pending", "merge", None)]["text"] == "join `merge` waits for `nap` (running) (1 arrival so far)"
    assert body["text"] == "\n".join(i["text"] for i in body["items"])

    # the child is an execution of its own, explained the same way
    child_body = explained(api, child["fields"]["child_execution_id"])
    assert [(i["kind"], i["step"]) for i in child_body["items"]] == [("attempt", "wait")]

    # `noetl status` prints the status, the progress and the same sentences
    proc = noetl("status", execution_id, "--server", server.url)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == [execution_id, "RUNNING", "tests/explain_parent", "v1"]
    assert lines[1].startswith("started ") and "progress " in lines[1]
    for kind in ("retry of `flaky` due at ", "iterator `each`: 0 of 2 done", "join `merge` waits for `nap`",
                 "step `call` waits for child execution", "step `nap` attempt 1 on worker `embedded-"):
        assert any(line.startswith(f"  - {kind}") for line in lines), (kind, proc.stdout)
    proc = noetl("status", execution_id, "--server", server.url, "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["execution"]["status"] == "RUNNING"
    assert {(i["kind"], i["step"]) for i in report["explain"]["items"]} == {(k, s) for k, s, _ in items}

    # cancelled: nothing to wait for, from the live state and after it is gone from memory alike
    assert api.post(f"/api/executions/{execution_id}/cancel", json={"reason": "test over"}).status_code == 202
    done = until(lambda: (b := explained(api, execution_id))["status"] == "CANCELLED" and b, 20, "the cancel")
    assert [i["kind"] for i in done["items"]] == ["finished"]
    assert done["items"][0]["text"].startswith("execution cancelled at ")
    proc = noetl("status", execution_id, "--server", server.url)
    assert proc.returncode == 0 and "CANCELLED" in proc.stdout.splitlines()[0]
    assert "execution cancelled at " in proc.stdout


def test_a_finished_execution_from_an_earlier_server_is_explained_from_its_summary(tmp_path: Path) -> None:
    """A restarted server no longer holds finished states in memory: the projected summary answers."""
    srv = Server(tmp_path / "noetl.db").start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30, headers=srv.auth) as client:
            register(client, CHILD)
            execution_id = start(client, "tests/explain_child", parameters={"slow": DOWN})   # fails at once
            until(lambda: explained(client, execution_id)["status"] == "FAILED", 20, "the failure")
        srv.kill(signal.SIGTERM)
        srv.start()
        with httpx.Client(base_url=srv.url, timeout=30, headers=srv.auth) as client:
            body = explained(client, execution_id)
        assert body["status"] == "FAILED" and [i["kind"] for i in body["items"]] == ["finished"]
        assert body["items"][0]["fields"]["error"].startswith("step 'wait' failed")
        assert body["items"][0]["text"].startswith("execution failed at ")
    finally:
        srv.kill(signal.SIGTERM)


@pytest.mark.parametrize("execution_id", ["nope", "x" * 10_000, "%00", "..%2F..%2Fetc%2Fpasswd", "%F0%9F%92%A5",
                                          "%ED%A0%80", "' OR 1=1 --"])
def test_unknown_or_hostile_ids_are_a_404(api: httpx.Client, execution_id: str) -> None:
    response = api.get(f"/api/executions/{execution_id}/explain")
    if "%2F" in execution_id:   # an encoded slash makes a path no route declares: the auth layer serves it to nobody
        assert response.status_code == 403 and "no role is declared" in response.json()["detail"], response.text
        return
    assert response.status_code == 404, response.text
    assert "no execution" in response.json()["detail"]
    assert api.get("/ready").status_code == 200


def test_noetl_status_refuses_bad_ids_and_unreachable_servers(server: Server) -> None:
    proc = noetl("status", "no-such-execution", "--server", server.url)
    assert proc.returncode == 2 and "no execution 'no-such-execution'" in proc.stderr
    proc = noetl("status", "..", "--server", server.url)
    assert proc.returncode == 2 and "no execution '..'" in proc.stderr
    proc = noetl("status", "x" * 5000, "--server", server.url)
    assert proc.returncode == 2 and "not an execution id" in proc.stderr
    proc = noetl("status", "bad\x1bid", "--server", server.url)
    assert proc.returncode == 2 and "not an execution id" in proc.stderr
    proc = noetl("status", "some-id", "--server", f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 2 and "cannot reach the server" in proc.stderr
    proc = noetl("status", "some-id", "--server", "not a url")
    assert proc.returncode == 2 and "error:" in proc.stderr


def test_noetl_status_refuses_an_answer_that_is_not_an_execution(tmp_path: Path) -> None:
    """A server that answers 200 with something else (a proxy's page, another service) is a clear error."""
    class Liar(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:   # noqa: N802
            body = b"[1, 2, 3]" if "explain" not in self.path else b'{"items": "nope"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Liar)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        proc = noetl("status", "e1", "--server", f"http://127.0.0.1:{httpd.server_address[1]}")
        assert proc.returncode == 2 and "not an object" in proc.stderr
    finally:
        httpd.shutdown()
        httpd.server_close()
