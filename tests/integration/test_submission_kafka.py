"""What the front door of `noetl server --kafka` admits, on real Kafka (Tansu) and Postgres, the server run as
a subprocess like a user runs it:

- an Idempotency-Key repeated (also across a restart) gives one execution; another body is a 409;
- a registration over the topic's size limit is a 413 and leaves no catalog row (nor a version number)
  behind; a start over it is a 413 too;
- above --max-in-flight, 429 with Retry-After;
- a role that dies ends the process with status 1 within seconds, and /health is not 200 meanwhile.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("asyncpg")
pytest.importorskip("aiokafka")
pytest.importorskip("faust")

import httpx  # noqa: E402

from test_server_kafka import READY_TIMEOUT, Server, _wait, schema, server, server_env  # noqa: E402

FIXTURES = (schema, server, server_env)   # test_server_kafka's: a schema, topics and a server per test

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]

RUN = "/api/executions/run"
HELLO = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: sub_hello, path: tests/sub_hello}
    workload: {name: World}
    workflow:
      - step: start
        next: [{step: end}]
      - step: end
        result: {greeting: "Hello, {{ workload.name }}!"}
    """)
SLOW = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: sub_slow, path: tests/sub_slow}
    workload: {seconds: 4}
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
    """)


def api(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=30, headers=server.auth)


def register(client: httpx.Client, text: str) -> dict[str, Any]:
    response = client.post("/api/catalog/register", json={"content": text})
    assert response.status_code == 200, response.text
    return response.json()


def executions_of(client: httpx.Client, path: str) -> list[str]:
    return [row["id"] for row in client.get("/api/executions", params={"path": path, "limit": 500}).json()]


def finished(client: httpx.Client, execution_id: str, timeout: float = 60) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        r = client.get(f"/api/executions/{execution_id}")
        return r.json() if r.status_code == 200 and r.json()["status"] in ("COMPLETED", "FAILED") else None
    return _wait(done, timeout, f"execution {execution_id} to finish")


def test_same_key_gives_one_execution_across_a_restart(server: Server) -> None:
    server.start()
    with api(server) as client:
        register(client, HELLO)
        key = f"kafka-{uuid.uuid4()}"
        body = {"path": "tests/sub_hello", "parameters": {"name": "Kafka"}}
        first = client.post(RUN, json=body, headers={"Idempotency-Key": key})
        assert first.status_code == 200, first.text
        # at once, before the execution is even folded: the same answer, the start sent again and dropped
        again = client.post(RUN, json=body, headers={"Idempotency-Key": key})
        assert again.status_code == 200 and again.json() == first.json()
        eid = first.json()["execution_id"]
        assert finished(client, eid)["status"] == "COMPLETED"
        assert client.post(RUN, json={**body, "parameters": {"name": "other"}},
                           headers={"Idempotency-Key": key}).status_code == 409
    assert server.terminate() == 0
    server.start()
    with api(server) as client:
        after = client.post(RUN, json=body, headers={"Idempotency-Key": key})
        assert after.status_code == 200 and after.json()["execution_id"] == eid
        # a client-chosen id: the same rules
        mine = f"mine-{uuid.uuid4().hex}"
        chosen = client.post(RUN, json={**body, "execution_id": mine})
        assert chosen.status_code == 200 and chosen.json()["execution_id"] == mine
        assert client.post(RUN, json={**body, "execution_id": eid}).status_code == 409
        assert client.post(RUN, json={**body, "execution_id": "a\x00b"}).status_code == 422
        finished(client, mine)
        time.sleep(1.0)   # a duplicate, had one started, would be projected by now
        assert sorted(executions_of(client, "tests/sub_hello")) == sorted([eid, mine])
        events = client.get(f"/api/executions/{eid}").json()["events"]
        assert [e["event_type"] for e in events].count("execution_start") == 1


def test_oversized_registration_is_413_and_leaves_nothing(server: Server) -> None:
    server.start()
    with api(server) as client:
        huge = HELLO + "# " + "x" * 1_200_000 + "\n"   # over the producer's 1 MB max_request_size
        refused = client.post("/api/catalog/register", json={"content": huge})
        assert refused.status_code == 413, refused.text
        assert "tests/sub_hello" in refused.json()["detail"]
        assert client.post("/api/catalog/register", json={"content": huge}).status_code == 413   # a retry too
        assert not [e for e in client.get("/api/catalog/list").json()["entries"] if e["path"] == "tests/sub_hello"]
        assert register(client, HELLO)["version"] == 1          # no version number was used up
        # a start whose parameters are over the limit: 413, and no execution
        big = client.post(RUN, json={"path": "tests/sub_hello", "parameters": {"blob": "y" * 1_200_000}})
        assert big.status_code == 413, big.text
        ok = client.post(RUN, json={"path": "tests/sub_hello"})
        assert ok.status_code == 200
        finished(client, ok.json()["execution_id"])
        assert executions_of(client, "tests/sub_hello") == [ok.json()["execution_id"]]


def test_above_the_bound_429_with_retry_after(server_env: dict[str, str], tmp_path: Path) -> None:
    from support import free_port

    srv = Server({**server_env, "NOETL_MAX_IN_FLIGHT": "2"}, free_port(), tmp_path / "bounded.log")
    try:
        srv.start()
        with api(srv) as client:
            register(client, SLOW)
            register(client, HELLO)
            first = client.post(RUN, json={"path": "tests/sub_slow"}, headers={"Idempotency-Key": "b1"})
            second = client.post(RUN, json={"path": "tests/sub_slow"})
            assert first.status_code == 200 and second.status_code == 200
            third = client.post(RUN, json={"path": "tests/sub_hello"})
            assert third.status_code == 429, third.text
            assert int(third.headers["Retry-After"]) >= 1
            assert client.post(RUN, json={"path": "tests/sub_slow"},
                               headers={"Idempotency-Key": "b1"}).json() == first.json()
            for eid in (first.json()["id"], second.json()["id"]):
                assert finished(client, eid)["status"] == "COMPLETED"

            def admitted() -> httpx.Response | None:
                r = client.post(RUN, json={"path": "tests/sub_hello"})
                return r if r.status_code == 200 else None
            later = _wait(admitted, 30, "the door to open again")
            assert finished(client, later.json()["id"])["status"] == "COMPLETED"
    finally:
        srv.stop_quietly()


FRAGILE = textwrap.dedent("""\
    import asyncio, os, sys
    from noetl_cli import main
    from noetl_worker import service

    TRIGGER = sys.argv[1]

    class Fragile(service.WorkerService):
        async def _fetch_loop(self):   # the worker's fetch loop dies once the trigger file exists
            real = asyncio.create_task(super()._fetch_loop())
            while not os.path.exists(TRIGGER):
                await asyncio.sleep(0.1)
            real.cancel()
            raise RuntimeError("injected: a role of the worker died")

    service.WorkerService = Fragile
    sys.argv = ["noetl", *sys.argv[2:]]
    main.app()
    """)


def test_a_dead_role_ends_the_process_non_zero(server_env: dict[str, str], tmp_path: Path) -> None:
    from support import free_port

    script, trigger = tmp_path / "fragile.py", tmp_path / "die-now"
    script.write_text(FRAGILE)
    port = free_port()
    log = tmp_path / "fragile.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(script), str(trigger), "server", "--port", str(port),
                                 "--kafka", server_env["NOETL_KAFKA_BOOTSTRAP"], "--database-url",
                                 server_env["NOETL_DATABASE_URL"]], env=server_env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(url + "/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        _wait(ready, READY_TIMEOUT, "the server to be ready")
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        trigger.touch()
        died = time.monotonic()
        code = proc.wait(timeout=30)
        assert code == 1, log.read_text()[-3000:]
        assert time.monotonic() - died < 10
        assert "injected: a role of the worker died" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
