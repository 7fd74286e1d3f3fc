"""Forged facts (issue 9 scope 4), reproduced as the issue found them, against real servers: a caller with
the `worker` role posts `action_completed` for a running step to POST /api/events, guessing its command id
(`<execution>:<step>:<visit>:<attempt>`). Without the attempt's token, or with a wrong one, the fact is
dropped: the step keeps running, no event records the forged result, the server counts the drop. With the
token the command carried (read here from the engine's own storage, as only a worker that received the
command could know it) the same post completes the step: the token is what makes the difference.

The key the tokens derive from and the tokens themselves appear in no answer of the read API.

- `noetl server` (embedded: SQLite, in-process workers): the token read from the state snapshot in the store;
- `noetl server --kafka` (real Tansu and Postgres): the token read from the commands topic.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from noetl_common.attempt_tokens import attempt_token
from noetl_common.state import ExecutionState
from support import bearer, free_port, local_admin_token, pg_token
from test_auth_server import Server, clean_env, token, until

NOETL = str(Path(sys.executable).with_name("noetl"))

PLAYBOOK = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: forge_target, path: tests/forge_target}
    workflow:
      - step: start
        next: [{step: nap}]
      - step: nap
        type: python
        code: |
          import time
          def main():
              time.sleep(90)
              return {"genuine": True}
        next: [{step: end}]
      - step: end
        result: {nap: "{{ nap }}"}
    """)
FORGED = {"forged": True, "amount": 1_000_000}


def _forgeries(eid: str, cid: str) -> list[dict[str, Any]]:
    """What a caller holding only the worker role can try: no token, a made-up one, one derived from ids."""
    base = {"kind": "action_completed", "execution_id": eid, "command_id": cid, "result": FORGED}
    return [base, {**base, "token": "x" * 43}, {**base, "token": attempt_token(eid, cid)},
            {**base, "kind": "action_failed", "error": "forged failure", "token": ""},
            {"kind": "heartbeat", "execution_id": eid, "command_id": cid, "token": "nope"}]


def _read_everything(client: httpx.Client, eid: str) -> str:
    """Every read route's answer about the execution, as one text."""
    answers = []
    for path in (f"/api/executions/{eid}", f"/api/executions/{eid}/events", f"/api/executions/{eid}/explain",
                 f"/api/execution/data/{eid}", f"/api/events/by-execution/{eid}", f"/api/events/summary/{eid}",
                 "/api/executions"):
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.text)
        answers.append(answer.text)
    return "\n".join(answers)


def _nap_started(client: httpx.Client, eid: str) -> bool:
    answer = client.get(f"/api/executions/{eid}")
    return answer.status_code == 200 and any(
        e["event_type"] == "action_started" and e["node_name"] == "nap" for e in answer.json()["events"])


def _forge_and_check(client: httpx.Client, worker: dict[str, str], eid: str, forged_count: Any) -> None:
    cid = f"{eid}:nap:1:1"
    before = forged_count()
    for fact in _forgeries(eid, cid):
        answer = client.post("/api/events", json=fact, headers=worker)
        assert answer.status_code == 202, answer.text   # the route takes it; the fold decides
    forgeries = len(_forgeries(eid, cid))
    until(lambda: forged_count() >= before + forgeries, 60)
    assert forged_count() == before + forgeries
    detail = client.get(f"/api/executions/{eid}").json()
    assert detail["status"] == "RUNNING"
    kinds = [(e["event_type"], e["node_name"]) for e in detail["events"]]
    assert ("action_completed", "nap") not in kinds and ("action_error", "nap") not in kinds
    assert "forged" not in json.dumps(detail)
    # the worker role may post facts and nothing else: no reads, no cancel
    assert client.get(f"/api/executions/{eid}", headers=worker).status_code == 403
    refused = client.post("/api/events", json={"kind": "cancel", "execution_id": eid}, headers=worker)
    assert refused.status_code == 403 and "operator" in refused.json()["detail"]


def _genuine_completes(client: httpx.Client, worker: dict[str, str], eid: str, key: str) -> None:
    cid = f"{eid}:nap:1:1"
    everything = _read_everything(client, eid)
    assert key not in everything and attempt_token(key, cid) not in everything
    fact = {"kind": "action_completed", "execution_id": eid, "command_id": cid, "result": {"posted": 1},
            "token": attempt_token(key, cid)}
    assert client.post("/api/events", json=fact, headers=worker).status_code == 202
    done = until(lambda: (d := client.get(f"/api/executions/{eid}").json())["status"] != "RUNNING" and d, 60)
    assert done["status"] == "COMPLETED" and done["result"] == {"nap": {"posted": 1}}
    everything = _read_everything(client, eid)
    assert key not in everything and attempt_token(key, cid) not in everything


# --------------------------------------------------------------------------------------------- embedded
@pytest.fixture
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("forged") / "noetl.db").start()
    yield srv
    srv.stop()


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_embedded_server_drops_forged_facts_and_takes_the_genuine_one(embedded: Server) -> None:
    with httpx.Client(base_url=embedded.url, timeout=30, headers=bearer(local_admin_token(embedded.store))) as admin:
        assert admin.post("/api/catalog/register", json={"content": PLAYBOOK}).status_code == 200
        eid = admin.post("/api/executions/run", json={"path": "tests/forge_target"}).json()["execution_id"]
        until(lambda: _nap_started(admin, eid), 60)
        worker = bearer(token(embedded, "worker", "forger"))
        _forge_and_check(admin, worker, eid,
                         lambda: _metric(admin.get("/metrics").text, "noetl_forged_facts"))
        with sqlite3.connect(f"file:{embedded.store}?mode=ro", uri=True) as db:
            # the snapshot is stored without its playbook, which state_playbooks holds once (sqlite_store)
            (rest, playbook) = db.execute("SELECT s.snapshot, p.playbook FROM states s JOIN state_playbooks p"
                                          " USING (execution_id) WHERE execution_id = ?", (eid,)).fetchone()
        key = ExecutionState.from_bytes(ExecutionState.join_snapshot(bytes(rest), bytes(playbook))).fact_key
        assert key and len(key) >= 43
        _genuine_completes(admin, worker, eid, key)


# ------------------------------------------------------------------------------------------------ kafka
class KafkaServer:
    """`noetl server --kafka` as a subprocess (the DSN from a 0600 file, as the docs tell operators)."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env, self.port, self.folder = env, free_port(), folder
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> KafkaServer:
        dsn_file = self.folder / "database-url"
        dsn_file.touch(mode=0o600)
        dsn_file.write_text(self.env["NOETL_DATABASE_URL"] + "\n")
        env = {k: v for k, v in self.env.items() if k != "NOETL_DATABASE_URL"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [NOETL, "server", "--port", str(self.port), "--kafka", env["NOETL_KAFKA_BOOTSTRAP"],
                 "--database-url-file", str(dsn_file)],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=self.folder)
        until(self._ready, 90)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def kafka_server(kafka_endpoint: Any, topics: Any, pg_dsn: str, tmp_path: Path) -> Iterator[KafkaServer]:
    pytest.importorskip("faust")
    import asyncpg

    schema = f"forged_{uuid.uuid4().hex[:12]}"
    env = clean_env(NOETL_KAFKA_BOOTSTRAP=kafka_endpoint.bootstrap, NOETL_DATABASE_URL=pg_dsn,
                    NOETL_STORE=str(tmp_path / "home" / "noetl.db"), NOETL_DATABASE_SCHEMA=schema,
                    NOETL_TOPIC_PREFIX=topics.prefix, NOETL_TOPIC_PARTITIONS="2",
                    NOETL_WORKER_PYTHON_PROCESSES="1", NOETL_LEASE_SECONDS="120",
                    NOETL_API_TOKEN=pg_token(pg_dsn, schema, "admin"),
                    NOETL_WORKER_TOKEN=pg_token(pg_dsn, schema, "worker"))
    if kafka_endpoint.kind == "tansu":   # Tansu answers a group join after half the session timeout
        env["NOETL_KAFKA_SESSION_TIMEOUT_MS"] = "3000"
    server = KafkaServer(env, tmp_path)
    try:
        yield server.start()
    finally:
        server.stop()

        async def drop() -> None:
            conn = await asyncpg.connect(pg_dsn)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()
        asyncio.run(drop())


async def _record(bootstrap: str, topic: str, field: str, value: str, timeout: float = 30.0) -> dict[str, Any]:
    """The first message on `topic` whose `field` is `value` (a command as a worker receives it, a start as
    the broker folds it)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                for record in batch:
                    message = json.loads(record.value)
                    if message.get(field) == value:
                        return message
    finally:
        await consumer.stop()
    raise AssertionError(f"no message with {field} {value} on {topic} within {timeout}s")


@pytest.mark.postgres
@pytest.mark.kafka
def test_kafka_server_drops_forged_facts_and_takes_the_genuine_one(kafka_server: KafkaServer, topics: Any,
                                                                  kafka_endpoint: Any) -> None:
    env = kafka_server.env
    with httpx.Client(base_url=kafka_server.url, timeout=30, headers=bearer(env["NOETL_API_TOKEN"])) as admin:
        assert admin.post("/api/catalog/register", json={"content": PLAYBOOK}).status_code == 200
        eid = admin.post("/api/executions/run", json={"path": "tests/forge_target"}).json()["execution_id"]
        until(lambda: _nap_started(admin, eid), 90)
        worker = bearer(env["NOETL_WORKER_TOKEN"])
        _forge_and_check(admin, worker, eid,
                         lambda: _metric(admin.get("/metrics").text, "noetl_broker_forged_facts_total"))
        cid = f"{eid}:nap:1:1"
        token_ = asyncio.run(_record(kafka_endpoint.bootstrap, topics.commands("default"), "command_id", cid))["token"]
        start = asyncio.run(_record(kafka_endpoint.bootstrap, topics.requests, "kind", "start"))
        assert start["execution_id"] == eid and token_ == attempt_token(start["fact_key"], cid)
        everything = _read_everything(admin, eid)
        assert token_ not in everything and start["fact_key"] not in everything
        fact = {"kind": "action_completed", "execution_id": eid, "command_id": cid, "result": {"posted": 1},
                "token": token_}
        assert admin.post("/api/events", json=fact, headers=worker).status_code == 202
        done = until(lambda: (d := admin.get(f"/api/executions/{eid}").json())["status"] != "RUNNING" and d, 90)
        assert done["status"] == "COMPLETED" and done["result"] == {"nap": {"posted": 1}}
        everything = _read_everything(admin, eid)
        assert token_ not in everything and start["fact_key"] not in everything
