"""GET /api/executions/{id}/explain and `noetl status` against `noetl server --kafka` on real Kafka (Tansu) and
Postgres: the API reads the in-process broker's table (docs/query.md). One execution runs a step on the
worker, waits for a retry timer, joins and waits for a child, all at once; then it is cancelled.
"""
from __future__ import annotations

import http.server
import json
import subprocess
import textwrap
import threading
from typing import Any, Iterator

import httpx
import pytest

from support import free_port
from test_server_kafka import NOETL, Server, _wait, schema, server, server_env  # noqa: F401 - fixtures

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]

PARENT = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: kexplain_parent, path: tests/kexplain_parent}
    workload: {slow: "", down: ""}
    workflow:
      - step: start
        next: [{step: nap}, {step: quick}, {step: flaky}, {step: call}]
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
        retry: {max_attempts: 4, initial_delay: 300}
        next: [{step: end}]
      - step: call
        type: playbook
        path: tests/kexplain_child
        data: {slow: "{{ workload.slow }}"}
        next: [{step: end}]
      - step: end
    """)
CHILD = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: kexplain_child, path: tests/kexplain_child}
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


@pytest.fixture
def slow_url() -> Iterator[str]:
    handler = type("Slow", (_Slow,), {"release": threading.Event()})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/slow"
    handler.release.set()
    httpd.shutdown()
    httpd.server_close()


def test_explain_and_noetl_status_on_noetl_server_kafka(server: Server, slow_url: str) -> None:  # noqa: F811
    server.start()
    with httpx.Client(base_url=server.url, timeout=30, headers=server.auth) as api:
        for text in (CHILD, PARENT):
            assert api.post("/api/catalog/register", json={"content": text}).status_code == 200
        run = api.post("/api/executions/run", json={"path": "tests/kexplain_parent", "parameters": {
            "slow": slow_url, "down": f"http://127.0.0.1:{free_port()}/down"}})
        assert run.status_code == 200, run.text
        execution_id = run.json()["execution_id"]

        def settled() -> dict[str, Any] | None:
            response = api.get(f"/api/executions/{execution_id}/explain")
            if response.status_code == 404:   # accepted, not folded and projected yet
                return None
            assert response.status_code == 200, response.text
            body = response.json()
            kinds = {(i["kind"], i["step"]) for i in body["items"]}
            started = any(i["kind"] == "attempt" and i["step"] == "nap" and i["fields"]["worker_id"]
                          for i in body["items"])
            return body if started and {("retry", "flaky"), ("child", "call"), ("pending", "merge")} <= kinds else None

        body = _wait(settled, 60, "every kind of wait on the broker's state")
        items = {(i["kind"], i["step"]): i for i in body["items"]}
        assert body["status"] == "RUNNING"
        assert items[("retry", "flaky")]["text"].endswith("(attempt 2 of 4)")
        assert items[("pending", "merge")]["text"] == "join `merge` waits for `nap` (running) (1 arrival so far)"
        nap = items[("attempt", "nap")]
        assert nap["text"].startswith(f"step `nap` attempt 1 on worker `{nap['fields']['worker_id']}`, started ")
        child_id = items[("child", "call")]["fields"]["child_execution_id"]
        child = _wait(lambda: (r := api.get(f"/api/executions/{child_id}/explain")).status_code == 200 and r.json(),
                      30, "the child's explanation")
        assert [(i["kind"], i["step"]) for i in child["items"]] == [("attempt", "wait")]

        proc = subprocess.run([NOETL, "status", execution_id, "--server", server.url, "--json"], env=server.env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["execution"]["status"] == "RUNNING"
        assert {(i["kind"], i["step"]) for i in report["explain"]["items"]} >= set(items)

        assert api.post(f"/api/executions/{execution_id}/cancel", json={"reason": "over"}).status_code == 202
        done = _wait(lambda: (b := api.get(f"/api/executions/{execution_id}/explain").json())["status"] == "CANCELLED"
                     and b, 30, "the cancel")
        assert [i["kind"] for i in done["items"]] == ["finished"]
        unknown = api.get("/api/executions/" + "x" * 5000 + "/explain")
        assert unknown.status_code == 404 and "no execution" in unknown.json()["detail"]
