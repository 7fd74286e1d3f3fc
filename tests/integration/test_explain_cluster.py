"""GET /api/executions/{id}/explain in a cluster of separate processes (scripts/cluster-start.sh on Tansu +
Postgres): the API (ingest) and query roles hold no state and ask the brokers (NOETL_BROKER_URL). With a
second broker in the group, the broker the API asks forwards the request to the one that owns the
execution's partition (faust's table_route), so every running execution is explained whoever owns it.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
from typing import Any

import httpx
import pytest

from support import free_port
from test_explain_kafka import CHILD, PARENT, slow_url  # noqa: F401 - fixture
from test_services_kafka import ROOT, _exports, _info, _ready, _wait, schema  # noqa: F401 - fixture

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]

SLOW = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: cexplain_slow, path: tests/cexplain_slow}
    workload: {slow: ""}
    workflow:
      - step: start
        next: [{step: nap}]
      - step: nap
        type: http
        endpoint: "{{ workload.slow }}"
        timeout: 120
        next: [{step: end}]
      - step: end
    """)


def _explained(url: str, execution_id: str, token: str) -> dict[str, Any] | None:
    response = httpx.get(f"{url}/api/executions/{execution_id}/explain", timeout=15,
                         headers={"Authorization": f"Bearer {token}"})
    return response.json() if response.status_code == 200 else None


def test_cluster_roles_explain_through_the_brokers(kafka_endpoint: Any, topics: Any, pg_dsn: str, schema: str,  # noqa: F811
                                                   slow_url: str) -> None:  # noqa: F811
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOETL_", "KAFKA_"))}
    env.update(KAFKA_BOOTSTRAP_SERVERS=kafka_endpoint.bootstrap, NOETL_DATABASE_URL=pg_dsn,
               NOETL_DATABASE_SCHEMA=schema, NOETL_TOPIC_PREFIX=topics.prefix, NOETL_TOPIC_PARTITIONS="4",
               NOETL_INGEST_PORT=str(free_port()), PYTHON=sys.executable, NOETL_LOG_LEVEL="WARNING",
               NOETL_CLUSTER_STOP_GRACE="10",
               # the brokers' /explain takes it (docs/security.md); the second broker below gets it too
               NOETL_BROKER_TOKEN=secrets.token_urlsafe(32))
    broker_auth = {"Authorization": f"Bearer {env['NOETL_BROKER_TOKEN']}"}
    if kafka_endpoint.kind == "tansu":
        env["NOETL_KAFKA_SESSION_TIMEOUT_MS"] = os.environ.get("NOETL_KAFKA_SESSION_TIMEOUT_MS", "3000")
    started = subprocess.run(["bash", str(ROOT / "scripts" / "cluster-start.sh")], env=env, capture_output=True,
                             text=True, timeout=150)
    assert started.returncode == 0, started.stderr[-3000:]
    exports = _exports(started.stdout)
    info_file, url = exports["NOETL_CLUSTER_INFO"], exports["NOETL_SERVER_URL"]
    token = exports["NOETL_API_TOKEN"]   # the admin token cluster-start.sh created (docs/security.md)
    second: subprocess.Popen[bytes] | None = None
    try:
        info = _info(info_file)
        query_url = f"http://127.0.0.1:{info['PORT_query']}"
        with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as api:
            for text in (CHILD, PARENT, SLOW):
                assert api.post("/api/catalog/register", json={"content": text}).status_code == 200
            run = api.post("/api/executions/run", json={"path": "tests/kexplain_parent", "parameters": {
                "slow": slow_url, "down": f"http://127.0.0.1:{free_port()}/down"}})
            parent = run.json()["execution_id"]

            def settled() -> dict[str, Any] | None:
                body = _explained(url, parent, token)
                kinds = {(i["kind"], i["step"]) for i in (body or {}).get("items", [])}
                return body if {("attempt", "nap"), ("retry", "flaky"), ("child", "call"),
                                ("pending", "merge")} <= kinds else None

            _wait(settled, 60, "the parent's waits, explained by the API role through the broker")
            body = settled()
            assert body is not None
            assert {i["text"] for i in body["items"] if i["kind"] == "pending"} == {
                "join `merge` waits for `nap` (running) (1 arrival so far)"}
            from_query = _explained(query_url, parent, token)   # the query role asks the broker too
            assert from_query is not None and [i["kind"] for i in from_query["items"]] == \
                [i["kind"] for i in body["items"]]

            # A second broker joins: partitions split between the two. The API still asks the first one.
            broker_port = free_port()
            second = subprocess.Popen([sys.executable, "-m", "noetl_broker"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True,
                                      env={**env, "NOETL_KAFKA_BOOTSTRAP": kafka_endpoint.bootstrap,
                                           "NOETL_HTTP_PORT": str(broker_port)})
            second_url = f"http://127.0.0.1:{broker_port}"
            first_url = f"http://127.0.0.1:{info['PORT_broker']}"

            def split() -> bool:
                try:
                    owned = [httpx.get(f"{u}/ready", timeout=2).json().get("partitions") or []
                             for u in (first_url, second_url)]
                except (httpx.HTTPError, ValueError):
                    return False
                return all(owned) and sorted(owned[0] + owned[1]) == [0, 1, 2, 3]

            _wait(split, 90, "both brokers to own partitions")
            runs = [api.post("/api/executions/run", json={"path": "tests/cexplain_slow",
                                                          "parameters": {"slow": slow_url}}).json()["execution_id"]
                    for _ in range(8)]

            def running(eid: str) -> bool:
                b = _explained(url, eid, token)
                return b is not None and any(i["kind"] == "attempt" and i["step"] == "nap" for i in b["items"])

            _wait(lambda: all(running(eid) for eid in runs + [parent]), 90,
                  "every execution explained, whichever broker owns it")
            # each broker's own view answers only for what it owns; through the API, every one is explained
            from noetl_broker.timers import partition_of
            second_owns = set(httpx.get(f"{second_url}/ready", timeout=5).json()["partitions"])
            owners = {partition_of(eid, 4) in second_owns for eid in runs + [parent]}
            assert owners == {True, False}, "all executions on one broker: nothing was forwarded"
            local = {eid: [httpx.get(f"{u}/explain/{eid}", timeout=10, headers=broker_auth).status_code
                           for u in (first_url, second_url)] for eid in runs}
            assert all(codes == [200, 200] for codes in local.values()), local   # forwarded when not its own
            # without the broker token, neither broker answers, nor forwards
            assert {httpx.get(f"{u}/explain/{eid}", timeout=10).status_code
                    for u in (first_url, second_url) for eid in runs} == {401}
            assert httpx.get(f"{first_url}/explain/{runs[0]}", params={"now": "nan"}, timeout=10,
                             headers=broker_auth).status_code == 400
            assert httpx.get(f"{first_url}/explain/no-such-execution", timeout=10,
                             headers=broker_auth).status_code == 404
            assert api.get("/api/executions/no-such-execution/explain").status_code == 404
            assert api.get("/api/executions/" + "y" * 5000 + "/explain").status_code == 404
            for eid in runs + [parent]:
                assert api.post(f"/api/executions/{eid}/cancel", json={"reason": "over"}).status_code == 202
    finally:
        if second is not None:
            second.send_signal(signal.SIGTERM)
            try:
                second.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(second.pid, signal.SIGKILL)
                second.wait()
        stopped = subprocess.run(["bash", str(ROOT / "scripts" / "cluster-stop.sh"), info_file], env=env,
                                 capture_output=True, text=True, timeout=90)
        assert stopped.returncode == 0, stopped.stderr
