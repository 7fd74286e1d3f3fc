"""The HTTP services wired onto real Kafka (Tansu) and real Postgres: the cluster API (`python -m
noetl_frontend`: ingest's writes + the reads), the query service, and all the roles as processes.

- the API (noetl_frontend.__main__.FrontendCluster): the writes produce the right messages (StartExecution
  on noetl.requests, facts on noetl.results, registrations on noetl.catalog), keyed as architecture §1
  says; credentials are stored encrypted in Postgres and never answered;
- query: events produced to noetl.events (from the pure simulator) show up on the read API; a malformed
  record goes to noetl.dlq with the reason and its partition keeps flowing; a restart that replays the
  topic (a new consumer group) re-projects with no duplicate and no changed row;
- end to end: the API (the `ingest` role), broker, worker, query and render as separate processes
  (scripts/cluster-start.sh):
  `noetl run --server` completes hello world, and a restarted query process re-projects identically.

Needs NOETL_TEST_PG_DSN; Kafka comes from the conftest fixtures. Each test has its own topic prefix and
Postgres schema.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import yaml

asyncpg = pytest.importorskip("asyncpg")
pytest.importorskip("aiokafka")
pytest.importorskip("fastapi")

import httpx  # noqa: E402
from cryptography.fernet import Fernet  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from noetl_common import projection  # noqa: E402
from noetl_common.codec import decode_inbound, encode  # noqa: E402
from noetl_common.messages import ActionCompleted, CancelExecution, DeadLetter, StartExecution  # noqa: E402
from noetl_common.ports import CatalogEntry  # noqa: E402
from noetl_common.simulate import Outcome, Simulation  # noqa: E402
from noetl_common.topics import Topics  # noqa: E402
from noetl_runtime.postgres_schema import migrate  # noqa: E402
from noetl_runtime import kafka_io  # noqa: E402
from noetl_runtime.auth import Authenticator  # noqa: E402
from noetl_runtime.tokens import PostgresTokens  # noqa: E402
from support import bearer, free_port, new_pg_token  # noqa: E402

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]

ROOT = Path(__file__).resolve().parents[2]
HELLO = (ROOT / "examples" / "hello_world.yaml").read_text()


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
async def schema(pg_dsn: str) -> AsyncIterator[str]:
    name = f"noetl_{uuid.uuid4().hex[:12]}"
    yield name
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def pool(pg_dsn: str, schema: str) -> AsyncIterator[Any]:
    p = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=8)
    await migrate(p, schema)
    yield p
    await p.close()


@pytest.fixture
async def settings(kafka_settings: Any, topics: Topics, pg_dsn: str, schema: str) -> Any:
    s = kafka_settings.model_copy(update={"database_url": pg_dsn, "database_schema": schema,
                                          "secret_key": SecretStr(Fernet.generate_key().decode())})
    await kafka_io.ensure_topics(s, topics, ["default"])
    return s


async def consume(settings: Any, topic: str, count: int, timeout: float = 20.0) -> list[Any]:
    """The first `count` records of `topic` (no group: every partition from the start)."""
    consumer = kafka_io.make_consumer(settings, [topic], None)
    await consumer.start()
    records: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(records) < count and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    assert len(records) >= count, f"{topic}: got {len(records)} of {count} records in {timeout}s"
    return records


async def until(check: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def snapshot(pool: Any, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the projection (updated_at included): equal snapshots = nothing was rewritten."""
    tables = {"event": "event_id", "execution": "execution_id", "catalog": "path, version"}
    out = {}
    async with pool.acquire() as conn:
        for table, order in tables.items():
            out[table] = [tuple(r) for r in await conn.fetch(f'SELECT * FROM "{schema}".{table} ORDER BY {order}')]
    return out


# ------------------------------------------------------------------------------------------------- ingest
async def test_ingest_produces_requests_results_and_catalog(settings: Any, topics: Topics, pool: Any) -> None:
    from noetl_frontend.__main__ import FrontendCluster

    cluster = FrontendCluster(settings)
    app = await cluster.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest",
                                     headers=bearer(await new_pg_token(pool, settings.database_schema))) as api:
            assert (await api.get("/ready")).status_code == 200
            reg = await api.post("/api/catalog/register", json={"content": HELLO})
            assert reg.status_code == 200, reg.text
            assert (reg.json()["path"], reg.json()["version"]) == ("examples/hello_world", 1)
            run = await api.post("/api/executions/run", json={"path": "examples/hello_world",
                                                               "parameters": {"name": "Kafka"}})
            assert run.status_code == 200, run.text
            eid = run.json()["execution_id"]
            assert (await api.post(f"/api/executions/{eid}/cancel", json={"reason": "test"})).status_code == 202
            fact = {"kind": "action_completed", "execution_id": eid, "command_id": f"{eid}:greet:1:1", "result": 7}
            assert (await api.post("/api/events", json=fact)).status_code == 202
            # the read routes are served here too (the one base URL of `noetl run --server`), from Postgres
            listed = (await api.get("/api/catalog/list")).json()
            assert "examples/hello_world" in json.dumps(listed)
            assert (await api.get(f"/api/executions/{eid}")).status_code == 404   # not projected: no query here
            bad = await api.post("/api/executions/run", json={"path": "no/such/playbook"})
            assert bad.status_code == 404
    finally:
        await cluster.stop()

    requests = await consume(settings, topics.requests, 2)
    assert {r.key for r in requests} == {eid.encode()}
    start, cancel = sorted((decode_inbound(r.value) for r in requests), key=lambda m: m.kind != "start")
    assert isinstance(start, StartExecution) and isinstance(cancel, CancelExecution)
    assert (start.execution_id, start.path, start.version) == (eid, "examples/hello_world", 1)
    assert start.payload == {"name": "Kafka"}
    assert start.playbook == yaml.safe_load(HELLO)
    assert start.lease_seconds == settings.lease_seconds
    assert cancel.reason == "test"

    (result,) = await consume(settings, topics.results, 1)
    assert result.key == eid.encode()
    completed = decode_inbound(result.value)
    assert isinstance(completed, ActionCompleted) and completed.result == 7

    (registration,) = await consume(settings, topics.catalog, 1)
    assert registration.key == b"examples/hello_world"
    entry = CatalogEntry.model_validate_json(registration.value)
    assert (entry.path, entry.version, entry.content) == ("examples/hello_world", 1, HELLO)


async def test_ingest_credentials_encrypted_in_postgres(settings: Any, pool: Any, schema: str) -> None:
    from noetl_frontend.__main__ import FrontendCluster

    secret = f"s3cr3t-{uuid.uuid4().hex}"
    cluster = FrontendCluster(settings)
    app = await cluster.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest",
                                     headers=bearer(await new_pg_token(pool, settings.database_schema))) as api:
            put = await api.post("/api/credentials", json={"name": "pg_main", "type": "postgres",
                                                           "data": {"user": "u", "password": secret}})
            assert put.status_code == 200, put.text
            answers = [put, await api.get("/api/credentials"), await api.get("/api/credentials/pg_main")]
            assert all(secret not in a.text for a in answers)
            assert answers[2].json()["type"] == "postgres"
            assert (await api.get("/api/credentials/pg_main", params={"include_data": "true"})).status_code == 403
    finally:
        await cluster.stop()
    stored = bytes(await pool.fetchval(f'SELECT secret FROM "{schema}".credential WHERE name = $1', "pg_main"))
    assert secret.encode() not in stored and b"password" not in stored
    key = settings.secret_key.get_secret_value().encode()
    assert json.loads(Fernet(key).decrypt(stored)) == {"user": "u", "password": secret}

    keyless = FrontendCluster(settings.model_copy(update={"secret_key": None}))
    app = await keyless.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest",
                                     headers=bearer(await new_pg_token(pool, settings.database_schema))) as api:
            refused = await api.post("/api/credentials", json={"name": "x", "data": {"password": secret}})
            assert refused.status_code == 503 and "NOETL_SECRET_KEY" in refused.json()["detail"]
            assert secret not in refused.text
            assert [c["name"] for c in (await api.get("/api/credentials")).json()["items"]] == ["pg_main"]
    finally:
        await keyless.stop()


# -------------------------------------------------------------------------------------------------- query
def simulated(execution_id: str) -> list[Any]:
    """The events of one hello-world run, from the pure fold with a scripted worker."""
    sim = Simulation(lambda cmd: Outcome(result={"greeting": "Hello, Sim!", "length": 3}))
    sim.start(yaml.safe_load(HELLO), {"name": "Sim"}, execution_id=execution_id)
    sim.run()
    return sim.events


async def test_query_projects_dead_letters_and_reprojects(settings: Any, topics: Topics, pool: Any,
                                                          schema: str) -> None:
    from noetl_query.__main__ import create_service_app
    from noetl_query.consumer import QueryConsumer
    from noetl_query.postgres_reads import PostgresReadModel
    from noetl_query.projector import Projector

    e1, e2 = f"ex-{uuid.uuid4().hex[:8]}", f"ex-{uuid.uuid4().hex[:8]}"
    events = {e1: simulated(e1), e2: simulated(e2)}
    malformed = b'{"event_id": "broken", "seq": "not a number"'
    entry = CatalogEntry(path="examples/hello_world", version=1, content=HELLO, document=yaml.safe_load(HELLO),
                         created_at=1_767_225_600.0)
    producer = kafka_io.make_producer(settings)
    await producer.start()
    try:
        half = len(events[e1]) // 2
        for event in events[e1][:half]:
            await producer.send_and_wait(topics.events, encode(event), key=e1.encode())
        # the bad record sits in the middle of e1's partition: what follows it must still be projected
        await producer.send_and_wait(topics.events, malformed, key=e1.encode())
        for event in events[e1][half:] + events[e2]:
            await producer.send_and_wait(topics.events, encode(event), key=event.execution_id.encode())
        await producer.send_and_wait(topics.catalog, entry.model_dump_json().encode(), key=entry.path.encode())
    finally:
        await producer.stop()
    total = sum(map(len, events.values())) + 2

    read = PostgresReadModel(pool, schema)
    consumer = QueryConsumer(settings, Projector(pool, schema))
    assert consumer.group == f"{topics.prefix}noetl-query"
    await consumer.start()
    try:
        app = create_service_app(read, consumer, Authenticator(PostgresTokens(pool, schema)))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://query",
                                     headers=bearer(await new_pg_token(pool, schema, "viewer"))) as api:
            async def completed(eid: str) -> Any:
                r = await api.get(f"/api/executions/{eid}")
                return r.json() if r.status_code == 200 and r.json()["status"] == "COMPLETED" else None

            for eid, log in events.items():
                detail = await until(lambda: completed(eid), what=f"{eid} COMPLETED")
                assert detail["result"] == {"greeting": "Hello, Sim!", "name_length": 3}
                assert set(detail["steps"]) == {"start", "greet", "end"}
                assert detail["steps"] == json.loads(json.dumps(projection.steps(log)))
                assert [e["seq"] for e in detail["events"]] == [e.seq for e in log]
            assert (await api.get("/ready")).status_code == 200
            await until(lambda: _true(consumer.stats["records"] >= total), what="every record applied")
            listed = (await api.get("/api/catalog/list")).json()["entries"]
            assert [(e["path"], e["version"]) for e in listed] == [("examples/hello_world", 1)]
            metrics = (await api.get("/metrics")).text
            assert "noetl_query_dead_letters 1.0" in metrics
    finally:
        await consumer.stop()

    (letter,) = await consume(settings, topics.dlq, 1)
    dead = DeadLetter.model_validate_json(letter.value)
    assert letter.key == e1.encode() and dead.source_topic == topics.events
    assert dead.original_value() == malformed and "invalid" in dead.reason
    assert consumer.stats["events"] == total - 2

    # A restart that replays the whole topic (a new group: as after a reset of the group's offsets)
    before = await snapshot(pool, schema)
    assert len(before["event"]) == total - 2 and len(before["execution"]) == 2 and len(before["catalog"]) == 1
    replay = QueryConsumer(settings, Projector(pool, schema), group=f"{topics.prefix}noetl-query-replay")
    await replay.start()
    try:
        await until(lambda: _true(replay.stats["records"] >= total), what="the replay")
    finally:
        await replay.stop()
    assert replay.stats["events"] == 0 and replay.stats["catalog"] == 0
    assert await snapshot(pool, schema) == before


async def _true(value: bool) -> bool:
    return value


# ------------------------------------------------------------------------------------------ end to end
def _exports(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            out[name] = shlex.split(value)[0] if value else ""
    return out


def _info(path: str) -> dict[str, str]:
    return {k: v.strip('"') for k, _, v in (line.partition("=") for line in Path(path).read_text().splitlines())}


def _metric(url: str, name: str, token: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5, headers=bearer(token)).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return -1.0


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_cluster_of_separate_processes_runs_hello_world(kafka_endpoint: Any, topics: Topics, pg_dsn: str,
                                                        schema: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOETL_", "KAFKA_"))}
    env.update(KAFKA_BOOTSTRAP_SERVERS=kafka_endpoint.bootstrap, NOETL_DATABASE_URL=pg_dsn,
               NOETL_DATABASE_SCHEMA=schema, NOETL_TOPIC_PREFIX=topics.prefix,
               NOETL_INGEST_PORT=str(free_port()), PYTHON=sys.executable, NOETL_LOG_LEVEL="WARNING",
               NOETL_CLUSTER_STOP_GRACE="10")
    if kafka_endpoint.kind == "tansu":
        env["NOETL_KAFKA_SESSION_TIMEOUT_MS"] = os.environ.get("NOETL_KAFKA_SESSION_TIMEOUT_MS", "3000")
    started = subprocess.run(["bash", str(ROOT / "scripts" / "cluster-start.sh")], env=env, capture_output=True,
                             text=True, timeout=150)
    assert started.returncode == 0, started.stderr[-3000:]
    exports = _exports(started.stdout)
    info_file, url = exports["NOETL_CLUSTER_INFO"], exports["NOETL_SERVER_URL"]
    token = exports["NOETL_API_TOKEN"]            # the admin token cluster-start.sh created
    env["NOETL_API_TOKEN"] = token
    query: subprocess.Popen[bytes] | None = None
    try:
        info = _info(info_file)
        assert set(info["ROLES"].split()) == {"ingest", "broker", "worker1", "query", "render"}
        pids = {info[f"PID_{role}"] for role in info["ROLES"].split()}
        assert len(pids) == 5                                    # five separate processes

        noetl = str(Path(sys.executable).parent / "noetl")
        run = subprocess.run([noetl, "run", "--server", url, str(ROOT / "examples" / "hello_world.yaml"), "--json",
                              "--payload", '{"name": "Cluster"}'], env=env, capture_output=True, text=True,
                             timeout=60)
        report = json.loads(run.stdout)
        assert run.returncode == 0 and report["status"] == "COMPLETED", run.stdout + run.stderr[-2000:]
        assert report["result"] == {"greeting": "Hello, Cluster!", "name_length": 7}
        assert {s: v["status"] for s, v in report["steps"].items()} == dict.fromkeys(("start", "greet", "end"),
                                                                                    "COMPLETED")
        render = httpx.post(f"http://127.0.0.1:{info['PORT_render']}/api/context/render", timeout=10,
                            headers=bearer(token),
                            json={"execution_id": report["execution_id"], "template": "{{ greet.greeting }}"})
        assert render.json()["rendered"] == "Hello, Cluster!", render.text

        # Restart the query process on a fresh group (it replays noetl.events from the start): no row changes.
        os.kill(int(info["PID_query"]), signal.SIGTERM)
        _wait(lambda: not Path(f"/proc/{info['PID_query']}").exists()
              or "zombie" in Path(f"/proc/{info['PID_query']}/status").read_text(), 20, "the query service to stop")
        before = asyncio.run(_snapshot_dsn(pg_dsn, schema))
        port = free_port()
        query = subprocess.Popen([sys.executable, "-m", "noetl_query"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True,
                                 env={**env, "NOETL_KAFKA_BOOTSTRAP": kafka_endpoint.bootstrap,
                                      "NOETL_HTTP_PORT": str(port), "NOETL_QUERY_GROUP": "noetl-query-restarted"})
        qurl = f"http://127.0.0.1:{port}"
        _wait(lambda: _ready(qurl), 40, "the restarted query service")
        expected = len(before["event"]) + len(before["catalog"])
        _wait(lambda: _metric(qurl, "noetl_query_records", token) >= expected, 30, "the replay")
        assert _metric(qurl, "noetl_query_events", token) == 0
        assert asyncio.run(_snapshot_dsn(pg_dsn, schema)) == before
        assert httpx.get(f"{qurl}/api/executions/{report['execution_id']}", timeout=5, headers=bearer(token)).json()["status"] == "COMPLETED"
    finally:
        if query is not None:
            query.terminate()
            try:
                query.wait(timeout=15)
            except subprocess.TimeoutExpired:
                query.kill()
                query.wait()
        stopped = subprocess.run(["bash", str(ROOT / "scripts" / "cluster-stop.sh"), info_file], env=env,
                                 capture_output=True, text=True, timeout=90)
        assert stopped.returncode == 0, stopped.stderr


async def _snapshot_dsn(dsn: str, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    p = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        return await snapshot(p, schema)
    finally:
        await p.close()
