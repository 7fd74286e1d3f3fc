"""The scenario of the step-output tests (GET /api/executions/{id}/logs), run against `noetl server`
(tests/unit/test_logs_api.py) and `noetl server --kafka` (tests/integration/test_logs_kafka.py): the same
playbooks, the same checks, and an answer both modes must give alike (`comparable`)."""
from __future__ import annotations

import base64
import textwrap
import time
from typing import Any

import httpx
import yaml

SECRET = "l0gs-Secret-Value-7Qx"
CREDENTIAL = {"name": "logtoken", "type": "generic", "data": {"value": SECRET}}

OK = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: logs_ok, path: tests/logs_ok}
    workflow:
      - step: start
        next: [{step: hello}]
      - step: hello
        type: python
        code: |
          import sys
          def main():
              print("hello out")
              print("hello err", file=sys.stderr)
              return 1
        next: [{step: quiet}]
      - step: quiet
        type: python
        code: "def main(): return 2"
        next: [{step: binary}]
      - step: binary
        type: python
        code: |
          import sys
          def main():
              sys.stdout.flush()
              sys.stdout.buffer.write(b"nul\\x00 ff\\xff\\xfe half\\xe2\\x82 ok\\n")
              sys.stdout.flush()
              return 3
        next: [{step: lines}]
      - step: lines
        type: python
        code: |
          def main():
              for i in range(100000):
                  print("line", i)
              print("x" * 3000000)
              print("the end")
              return 4
        next: [{step: secret}]
      - step: secret
        type: python
        data: {t: "{{ secret.logtoken }}"}
        code: |
          import base64
          def main(t):
              print("b64", base64.b64encode(t.encode()).decode())
              print("plain", t)
              return 5
        next: [{step: each}]
      - step: each
        type: iterator
        collection: [0, 1, 2]
        element: n
        task:
          type: python
          data: {n: "{{ n }}"}
          code: |
            def main(n):
                if n != 1:
                    print("item", n)
                return n
        next: [{step: end}]
      - step: end
    """)

FAIL = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: logs_fail, path: tests/logs_fail}
    workflow:
      - step: start
        next: [{step: flaky}]
      - step: flaky
        type: python
        retry: {max_attempts: 2, initial_delay: 0.1}
        code: |
          def main():
              print("trying")
              raise ValueError("no luck")
        next: [{step: end}]
      - step: end
    """)

# For the fold and read-model tests (no server): a step retried, and an iterator whose items retry.
RETRIED_AND_ITERATED = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "t", "path": "t"},
                        **yaml.safe_load("""
workflow:
  - step: start
    next: [{step: flaky}]
  - step: flaky
    type: python
    retry: {max_attempts: 3}
    code: "def main(): return 1"
    next: [{step: each}]
  - step: each
    type: iterator
    collection: [0, 1, 2]
    element: n
    task:
      type: python
      data: {n: "{{ n }}"}
      retry: {max_attempts: 2}
      code: "def main(n): return n"
    next: [{step: end}]
  - step: end
""")}


def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)
    return value


def run_both(api: httpx.Client, timeout: float = 90) -> tuple[str, str]:
    """Register the playbooks and the credential, run both; returns (ok id, failed id) once both ended."""
    for text in (OK, FAIL):
        assert api.post("/api/catalog/register", json={"content": text}).status_code == 200
    assert api.post("/api/credentials", json=CREDENTIAL).status_code in (200, 201)
    ids = []
    for path in ("tests/logs_ok", "tests/logs_fail"):
        run = api.post("/api/executions/run", json={"path": path})
        assert run.status_code == 200, run.text
        ids.append(run.json()["execution_id"])

    def ended(execution_id: str) -> Any:
        r = api.get(f"/api/executions/{execution_id}", params={"events": "false"})
        return r.status_code == 200 and r.json()["status"] in ("COMPLETED", "FAILED", "CANCELLED") and r.json()

    assert until(lambda: ended(ids[0]), timeout, "logs_ok to end")["status"] == "COMPLETED"
    assert until(lambda: ended(ids[1]), timeout, "logs_fail to end")["status"] == "FAILED"
    return ids[0], ids[1]


def logs(api: httpx.Client, execution_id: str, **params: Any) -> dict[str, Any]:
    response = api.get(f"/api/executions/{execution_id}/logs", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert int(response.headers["X-Total-Count"]) >= len(body["items"])
    return body


def check_ok(body: dict[str, Any], execution_id: str) -> None:
    """What the successful playbook's logs must say, in any mode."""
    assert set(body) == {"execution_id", "items"} and body["execution_id"] == execution_id
    items = body["items"]
    assert [(i["step"], i["index"]) for i in items] == [
        ("hello", None), ("binary", None), ("lines", None), ("secret", None), ("each", 0), ("each", 2)]
    assert [i["time"] for i in items] == sorted(i["time"] for i in items)
    for item in items:
        assert set(item) == {"step", "attempt", "index", "command_id", "time", "status", "output", "error",
                             "truncated"}
        assert item["status"] == "COMPLETED" and item["error"] is None and item["attempt"] == 1
        assert item["command_id"].startswith(execution_id + ":" + item["step"] + ":")
    by = {(i["step"], i["index"]): i for i in items}
    assert by[("hello", None)]["output"] in ("hello out\nhello err\n", "hello err\nhello out\n")
    assert by[("binary", None)]["output"] == "nul\ufffd ff\ufffd\ufffd half\ufffd ok\n"
    lines = by[("lines", None)]
    assert lines["truncated"] and lines["output"].startswith("line 0\nline 1\n")
    assert lines["output"].endswith("x" * 1000 + "\nthe end\n")
    assert len(lines["output"].encode()) <= 64 * 1024 + 100          # NOETL_STEP_LOG_MAX_BYTES' default
    secret = by[("secret", None)]["output"]
    assert secret == "b64 ***\nplain ***\n"
    assert by[("each", 0)]["output"] == "item 0\n" and by[("each", 2)]["output"] == "item 2\n"
    assert all(not i["truncated"] for i in items if i["step"] != "lines")


def check_failed(body: dict[str, Any], execution_id: str) -> None:
    items = body["items"]
    assert [(i["step"], i["attempt"], i["status"]) for i in items] == [("flaky", 1, "FAILED"), ("flaky", 2, "FAILED")]
    for attempt, item in enumerate(items, 1):
        assert item["error"] == "ValueError: no luck" and item["index"] is None
        assert item["output"].startswith("trying\n") and "Traceback" in item["output"]
        assert "ValueError: no luck" in item["output"]
        assert item["command_id"] == f"{execution_id}:flaky:1:{attempt}"


def no_secret_anywhere(text: str) -> None:
    for form in (SECRET, base64.b64encode(SECRET.encode()).decode()):
        assert form not in text


def comparable(body: dict[str, Any], execution_id: str) -> list[dict[str, Any]]:
    """The items without what differs between two runs by nature (ids, clock)."""
    return [{**i, "time": None, "command_id": i["command_id"].replace(execution_id, "E")} for i in body["items"]]
