"""The query service's Postgres read model against a real Postgres (NOETL_TEST_PG_DSN).

Events come from the pure simulator (no Kafka): the projection must equal `noetl_common.projection` over
the same events, and re-projecting (a duplicate batch, a restart from offset 0, two projectors at once)
must leave the tables exactly as they were. Each test works in a schema of its own, dropped at the end.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator

import pytest
import yaml

asyncpg = pytest.importorskip("asyncpg")

from noetl_common import projection  # noqa: E402
from noetl_common.messages import CancelExecution, Event  # noqa: E402
from noetl_common.ports import CatalogEntry  # noqa: E402
from noetl_common.simulate import Outcome, Simulation  # noqa: E402
from noetl_query.handlers import ExecutionFilters, Page  # noqa: E402
from noetl_query.postgres_reads import PostgresReadModel  # noqa: E402
from noetl_runtime.postgres_schema import MigrationError, migrate, migrations  # noqa: E402
from noetl_query.projector import Projector  # noqa: E402
from support import bearer, new_pg_token  # noqa: E402

pytestmark = pytest.mark.postgres

T0 = 1_767_225_600.0          # 2026-01-01T00:00:00Z


def pb(name: str, body: str) -> dict[str, Any]:
    doc = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": name, "path": f"tests/{name}"}}
    doc.update(yaml.safe_load(body))
    return doc


LINEAR = pb("linear", """
workflow:
  - step: start
    next: [{step: a}]
  - step: a
    type: python
    code: "def main(): return 1"
    next: [{step: b}]
  - step: b
    type: python
    code: "def main(): return 2"
    next: [{step: end}]
  - step: end
    result: {b: "{{ b }}"}
""")
RETRY = pb("retry", """
workflow:
  - step: start
    next: [{step: flaky}]
  - step: flaky
    type: http
    endpoint: http://x
    retry: {max_attempts: 3, initial_delay: 0.1, retry_when: "{{ status_code >= 500 }}"}
    next: [{step: end}]
  - step: end
""")
CHILD = pb("parent", """
workflow:
  - step: start
    next: [{step: call}]
  - step: call
    type: playbook
    path: tests/kid
    return_step: work
    next: [{step: end}]
  - step: end
""")
KID = pb("kid", """
workflow:
  - step: start
    next: [{step: work}]
  - step: work
    type: python
    code: "def main(): return 3"
    next: [{step: end}]
  - step: end
""")


def chain(steps: int) -> dict[str, Any]:
    names = [f"s{i}" for i in range(steps)]
    workflow: list[dict[str, Any]] = [{"step": "start", "next": [{"step": names[0]}]}]
    for i, name in enumerate(names):
        workflow.append({"step": name, "type": "python", "code": "def main(): return 1",
                         "next": [{"step": names[i + 1] if i + 1 < steps else "end"}]})
    workflow.append({"step": "end"})
    return {"apiVersion": "noetl.io/v1", "kind": "Playbook",
            "metadata": {"name": f"chain{steps}", "path": f"bench/chain{steps}"}, "workflow": workflow}


def simulate(doc: dict[str, Any], worker: Any, execution_id: str, now: float, settle: bool = True,
             cancel: bool = False) -> list[Event]:
    sim = Simulation(worker, catalog={"tests/kid": KID}, now=now)
    sim.start(doc, execution_id=execution_id)
    if settle:
        sim.run()
    else:                                   # deliver what is there, fire no timer: the run stays in flight
        while sim.inbox:
            sim.deliver(sim.inbox.pop(0))
        if cancel:
            sim.deliver(CancelExecution(execution_id=execution_id, time=now + 5))
    return sim.events


def flaky(cmd: Any) -> Outcome:
    return Outcome(ok=False, error="HTTP 500", status_code=500) if cmd.attempt < 3 else Outcome(result={"ok": 1})


def scenario(tag: str = "") -> list[Event]:
    """Linear runs on three days, a retry that succeeds, one that always fails, a parent with its child, a
    run still in flight, a cancelled one; interleaved across executions as a partition would carry them."""
    logs = [simulate(LINEAR, lambda c: Outcome(result={"v": c.step}), f"lin-{i}{tag}", T0 + i * 86_400 + 60)
            for i in range(3)]
    logs.append(simulate(RETRY, flaky, f"retry-ok{tag}", T0 + 120))
    logs.append(simulate(RETRY, lambda c: Outcome(ok=False, error="HTTP 503", status_code=503),
                         f"retry-fail{tag}", T0 + 180))
    logs.append(simulate(CHILD, lambda c: Outcome(result={"kid": True}), f"parent{tag}", T0 + 240))
    logs.append(simulate(LINEAR, lambda c: Outcome(hang=True), f"inflight{tag}", T0 + 300, settle=False))
    logs.append(simulate(LINEAR, lambda c: Outcome(hang=True), f"cancelled{tag}", T0 + 360, settle=False,
                         cancel=True))
    mixed: list[Event] = []
    while any(logs):                        # round-robin: per execution order kept, executions interleaved
        for log in logs:
            if log:
                mixed.append(log.pop(0))
    return mixed


def by_execution(events: list[Event]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = {}
    for event in events:
        out.setdefault(event.execution_id, []).append(event)
    return {eid: sorted(log, key=lambda e: e.seq) for eid, log in out.items()}


def batches(events: list[Event], size: int) -> list[list[Event]]:
    return [events[i:i + size] for i in range(0, len(events), size)]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[tuple[Any, str]]:
    """A pool and a fresh, migrated schema of this test's own (dropped afterwards)."""
    schema = f"noetl_{uuid.uuid4().hex[:12]}"
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=6)
    try:
        await migrate(pool, schema)
        yield pool, schema
    finally:
        await pool.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await pool.close()


async def snapshot(pool: Any, schema: str, *, with_updated_at: bool = True) -> dict[str, list[tuple]]:
    """Every row of every table, in key order: the thing that must not change on re-projection."""
    skip = set() if with_updated_at else {"updated_at"}
    out: dict[str, list[tuple]] = {}
    for table, key in (("event", "event_id"), ("execution", "execution_id"), ("catalog", "path, version")):
        rows = await pool.fetch(f'SELECT * FROM "{schema}".{table} ORDER BY {key}')
        out[table] = [tuple(v for k, v in r.items() if k not in skip) for r in rows]
    return out


async def assert_matches_projection(read: PostgresReadModel, events: list[Event]) -> None:
    expected = by_execution(events)
    summaries, total = await read.executions(ExecutionFilters(), Page(limit=1000))
    assert total == len(expected) == len(summaries)
    for summary in summaries:
        assert summary == projection.summary(expected[summary["execution_id"]])
    for eid, log in expected.items():
        assert await read.execution(eid) == projection.summary(log)
        assert await read.events(eid) == log
        detail = await read.execution_detail(eid)
        assert detail["steps"] == projection.steps(log) and detail["events"] == log


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("size", [1, 7, 10_000])   # batches split executions anywhere, or not at all
async def test_projection_equals_projection_summary(pg, size):
    pool, schema = pg
    events = scenario()
    projector = Projector(pool, schema)
    added = 0
    for batch in batches(events, size):
        added += await projector.apply(batch)
    assert added == len(events)
    read = PostgresReadModel(pool, schema)
    await assert_matches_projection(read, events)
    status = {s["execution_id"]: (s["status"], s["progress"])
              for s in (await read.executions(ExecutionFilters(), Page(limit=100)))[0]}
    assert status["lin-0"] == ("COMPLETED", 100) and status["retry-ok"] == ("COMPLETED", 100)
    assert status["retry-fail"] == ("FAILED", 100) and status["cancelled"] == ("CANCELLED", 100)
    assert status["inflight"][0] == "RUNNING" and 0 <= status["inflight"][1] < 100
    child = next(eid for eid in status if eid.startswith("child:"))
    assert (await read.execution(child))["parent_execution_id"] == "parent"
    assert (await read.execution("lin-0"))["result"] == {"b": {"v": "b"}}
    detail = await read.execution_detail("retry-ok")
    assert detail["steps"]["flaky"]["attempts"] == 3 and detail["steps"]["flaky"]["status"] == "COMPLETED"
    assert await read.execution("nope") is None and await read.events("nope") == []
    assert [e.seq for e in await read.events("lin-1", after_seq=3)] == list(range(4, len(by_execution(events)["lin-1"])))


async def test_reprojection_is_idempotent_and_restart_safe(pg):
    pool, schema = pg
    events = scenario()
    first = Projector(pool, schema)
    for batch in batches(events, 10):
        await first.apply(batch)
    before = await snapshot(pool, schema)
    # The same batches again (a redelivery): nothing new, not a byte changed (updated_at included).
    for batch in batches(events, 10):
        assert await first.apply(batch) == 0
    # A restart: a new projector (cold cache) replays the topic from offset 0 in other batch sizes.
    restarted = Projector(pool, schema)
    for batch in batches(events, 33):
        assert await restarted.apply(batch) == 0
    assert await snapshot(pool, schema) == before
    counts = await pool.fetchrow(f'SELECT (SELECT count(*) FROM "{schema}".event) AS e,'
                                 f' (SELECT count(DISTINCT event_id) FROM "{schema}".event) AS d,'
                                 f' (SELECT count(*) FROM "{schema}".execution) AS x')
    assert counts["e"] == counts["d"] == len(events) and counts["x"] == len(by_execution(events))
    # A batch holding a duplicate of itself and of stored events only adds what is new.
    extra = simulate(LINEAR, lambda c: Outcome(result=1), "late", T0 + 999)
    assert await restarted.apply(events[:5] + extra + extra[:3]) == len(extra)


async def test_cache_and_cold_reads_give_the_same_tables(pg, pg_dsn):
    """The projector's in-memory logs are an optimisation only: without them (every log re-read from the
    table), or with a projector restarted mid-stream, the tables come out identical."""
    pool, schema = pg
    events = scenario()
    cached = Projector(pool, schema)
    for batch in batches(events, 4):
        await cached.apply(batch)
    assert cached.stats == {"events": len(events), "log_reads": 0}
    expected = await snapshot(pool, schema, with_updated_at=False)

    other = f"noetl_{uuid.uuid4().hex[:12]}"
    await migrate(pool, other)
    try:
        half = len(events) // 2
        uncached = Projector(pool, other, cache_events=0)
        for batch in batches(events[:half], 4):
            await uncached.apply(batch)
        assert uncached.stats["log_reads"] > 0
        resumed = Projector(pool, other)    # cold cache, rows already there: must read the logs back
        for batch in batches(events[half - 10:], 4):
            await resumed.apply(batch)
        assert 0 < resumed.stats["log_reads"] <= len(by_execution(events))   # then the cache serves
        assert await snapshot(pool, other, with_updated_at=False) == expected
    finally:
        await pool.execute(f'DROP SCHEMA "{other}" CASCADE')


async def test_concurrent_projectors_serialise_per_execution(pg):
    """A rebalance can let two consumers project the same executions at once: the per-execution lock makes
    the outcome the same as one projector's."""
    pool, schema = pg

    async def run(projector: Projector, part: list[Event], size: int) -> None:
        for batch in batches(part, size):
            await projector.apply(batch)
    everything: list[Event] = []
    for round_ in range(4):
        events = scenario(f"-r{round_}")
        everything += events
        n = len(events)
        left, right = events[: int(n * 0.7)], events[int(n * 0.3):]
        await asyncio.gather(run(Projector(pool, schema), left, 3), run(Projector(pool, schema), right, 5),
                             run(Projector(pool, schema), events[::-1], 11))
        # Disjoint halves of every log at once: without the lock each sees only its half plus what was
        # committed before, and the last upsert would win with a partial log.
        events = scenario(f"-s{round_}")
        everything += events
        await asyncio.gather(Projector(pool, schema).apply(events[0::2]), Projector(pool, schema).apply(events[1::2]))
    await assert_matches_projection(PostgresReadModel(pool, schema), everything)


async def test_filters_and_pagination(pg):
    pool, schema = pg
    events = scenario()
    await Projector(pool, schema).apply(events)
    read = PostgresReadModel(pool, schema)

    async def ids(page: Page = Page(limit=100), **filters: Any) -> tuple[list[str], int]:
        summaries, total = await read.executions(ExecutionFilters(**filters), page)
        return [s["execution_id"] for s in summaries], total

    everything, total = await ids()
    starts = [projection.summary(log)["start_time"] for log in by_execution(events).values()]
    assert total == len(everything) == len(starts)
    got = [(await read.execution(e))["start_time"] for e in everything]
    assert got == sorted(got, reverse=True)                       # newest first
    pages = [await ids(Page(limit=3, offset=o)) for o in range(0, total + 3, 3)]
    assert [e for p, _ in pages for e in p] == everything and all(t == total for _, t in pages)
    assert (await ids(Page(limit=3, offset=total)))[0] == []

    assert set((await ids(status="failed"))[0]) == {"retry-fail"}
    assert set((await ids(status="RUNNING"))[0]) == {"inflight"}
    assert set((await ids(status="CANCELLED"))[0]) == {"cancelled"}
    assert len((await ids(status="COMPLETED"))[0]) == 6           # 3 linear, retry-ok, parent, child
    assert set((await ids(path="tests/retry"))[0]) == {"retry-ok", "retry-fail"}
    assert set((await ids(path="tests/retry", status="COMPLETED"))[0]) == {"retry-ok"}
    assert (await ids(path="tests/nothing")) == ([], 0)
    assert set((await ids(parent_execution_id="parent"))[0]) == {e for e in everything if e.startswith("child:")}

    day = timedelta(days=1)
    t0 = datetime.fromtimestamp(T0, timezone.utc)
    assert set((await ids(since=t0 + day))[0]) == {"lin-1", "lin-2"}
    assert set((await ids(since=t0 + day, until=t0 + day + timedelta(minutes=1)))[0]) == {"lin-1"}  # inclusive
    assert set((await ids(until=t0 + timedelta(seconds=180)))[0]) == {"lin-0", "retry-ok", "retry-fail"}
    naive = datetime(2026, 1, 2)                                  # naive = UTC
    assert set((await ids(since=naive, path="tests/linear"))[0]) == {"lin-1", "lin-2"}


async def test_catalog_upserts_and_reads(pg):
    pool, schema = pg
    projector, read = Projector(pool, schema), PostgresReadModel(pool, schema)
    entries = [CatalogEntry(path="tests/linear", version=v, content=f"# v{v}\n", document={**LINEAR, "v": v},
                            created_at=T0 + v) for v in (1, 2)]
    entries.append(CatalogEntry(path="tests/kid", version=1, content="kid", document=KID, created_at=T0 + 5.25))
    assert await projector.apply_catalog(entries) == 3
    before = await snapshot(pool, schema)
    assert await projector.apply_catalog(entries + entries[:1]) == 0       # replay: no change at all
    assert await snapshot(pool, schema) == before
    listed = await read.catalog()
    assert [(e.path, e.version) for e in listed] == [("tests/kid", 1), ("tests/linear", 1), ("tests/linear", 2)]
    assert listed[0] == entries[2]
    assert (await read.playbook("tests/linear")).version == 2
    assert (await read.playbook("tests/linear", 1)).document == {**LINEAR, "v": 1}
    assert (await read.playbook("tests/linear", "latest")).version == 2
    assert await read.playbook("tests/linear", 9) is None and await read.playbook("nope") is None


async def test_awkward_values_survive(pg):
    """Values jsonb refuses (NaN, an escaped NUL) must not poison the partition; literal backslashes and
    unicode come back unchanged."""
    pool, schema = pg
    result = {"nan": float("nan"), "nul": "a\x00b", "literal": "\\u0000 stays", "text": "žluť 🚀", "big": 2**62}
    events = simulate(LINEAR, lambda c: Outcome(result=result), "odd", T0)
    await Projector(pool, schema).apply(events)
    read = PostgresReadModel(pool, schema)
    summary = await read.execution("odd")
    assert summary["status"] == "COMPLETED"
    stored = (await read.execution_detail("odd"))["steps"]["a"]["result"]
    assert stored == {"nan": None, "nul": "a\ufffdb", "literal": "\\u0000 stays", "text": "žluť 🚀", "big": 2**62}


async def test_rebuild_recomputes_rows_from_the_log(pg):
    pool, schema = pg
    events = scenario()
    projector = Projector(pool, schema)
    await projector.apply(events)
    before = await snapshot(pool, schema, with_updated_at=False)
    await pool.execute(f'UPDATE "{schema}".execution SET status = \'BROKEN\', progress = -1')
    assert await projector.rebuild() == len(by_execution(events))
    assert await snapshot(pool, schema, with_updated_at=False) == before


async def test_migrations_are_idempotent_and_concurrent_safe(pg_dsn):
    schema = f"noetl_{uuid.uuid4().hex[:12]}"
    conns = [await asyncpg.connect(pg_dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(c, schema) for c in conns))
        versions = [m.version for m in migrations()]
        assert sorted(results, key=len) == [[], [], versions]          # exactly one applied them
        assert await migrate(conns[0], schema) == []
        rows = await conns[0].fetch(f'SELECT version FROM "{schema}".schema_migrations ORDER BY version')
        assert [r["version"] for r in rows] == versions
        tables = {r["tablename"] for r in await conns[0].fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)}
        assert {"event", "execution", "catalog", "schema_migrations"} <= tables
        await conns[0].execute(f'UPDATE "{schema}".schema_migrations SET checksum = \'x\' WHERE version = 1')
        with pytest.raises(MigrationError, match="edited"):
            await migrate(conns[0], schema)
        with pytest.raises(ValueError):
            await migrate(conns[0], 'bad"; DROP SCHEMA public; --')
    finally:
        await conns[0].execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        for c in conns:
            await c.close()


async def test_projection_throughput(pg, capsys):
    """20,000 events of 5-step chains, interleaved across executions, in batches of 500."""
    pool, schema = pg
    sim = Simulation(lambda c: Outcome(result=1), now=T0)
    doc = chain(5)
    runs = 0
    while len(sim.events) < 20_000:
        for _ in range(50):
            sim.start(doc, execution_id=f"x{runs}")
            runs += 1
        sim.run()
    events = sim.events[:20_000]
    projector = Projector(pool, schema)
    started = time.perf_counter()
    for batch in batches(events, 500):
        await projector.apply(batch)
    elapsed = time.perf_counter() - started
    rate = len(events) / elapsed
    with capsys.disabled():
        print(f"\nquery projection: {len(events)} events ({runs} executions) in batches of 500: "
              f"{rate:,.0f} events/s")
    assert await pool.fetchval(f'SELECT count(*) FROM "{schema}".event') == len(events)
    assert rate > 1_000


async def test_read_api_handlers_over_postgres(pg):
    """The transport-free handlers of the read API give the same answers over Postgres as projection does."""
    from noetl_query import handlers as h

    pool, schema = pg
    events = scenario()
    projector = Projector(pool, schema)
    await projector.apply(events)
    await projector.apply_catalog([CatalogEntry(path="tests/linear", version=1, content="x", document=LINEAR,
                                                created_at=T0)])
    read = PostgresReadModel(pool, schema)
    log = by_execution(events)["retry-ok"]
    detail = await h.get_execution(read, "retry-ok")
    assert detail["status"] == "COMPLETED" and detail["steps"] == projection.steps(log)
    assert len(detail["events"]) == len(log)
    assert await h.get_execution(read, "retry-ok", include_events=False) == h.execution_out(projection.summary(log))
    summary = (await h.events_summary(read, "retry-fail"))["summary"]
    assert summary["status"] == "FAILED" and summary["counts"]["action_error"] == 3
    items, total = await h.list_executions(read, ExecutionFilters(status="FAILED"), Page())
    assert total == 1 and items[0]["id"] == "retry-fail" and items[0]["playbook_id"] == "tests/retry"
    assert (await h.catalog_list(read, include_content=True))["entries"][0]["payload"] == LINEAR
    assert (await h.catalog_playbook(read, "tests/linear"))["version"] == 1
    with pytest.raises(LookupError):
        await h.get_execution(read, "nope")


async def test_render_service_reads_the_projected_log(pg):
    """`python -m noetl_render`'s app over the projected event log (noetl_runtime.postgres_store.read_events):
    renders against the context the events give, and answers hostile requests with that request's error."""
    pytest.importorskip("fastapi")
    import httpx

    from noetl_render.__main__ import create_service_app
    from noetl_runtime.postgres_store import read_events

    pool, schema = pg
    events = scenario()
    await Projector(pool, schema).apply(events)
    log = by_execution(events)["lin-0"]
    assert await read_events(pool, schema, "lin-0") == log
    assert await read_events(pool, schema, "lin-0", after_seq=log[1].seq, limit=2) == log[2:4]
    assert await read_events(pool, schema, "lin-0", limit=-5) == []
    assert await read_events(pool, schema, "no-such-execution") == []
    with pytest.raises(ValueError, match="invalid schema name"):
        await read_events(pool, 'x"; DROP TABLE event; --', "lin-0")

    app = create_service_app(pool, schema)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://render",
                                 headers=bearer(await new_pg_token(pool, schema, "viewer"))) as api:
        async def render(body: Any) -> httpx.Response:
            return await api.post("/api/context/render", json=body)

        ok = await render({"execution_id": "lin-0", "template": {"a": "{{ a.v }}", "id": "{{ execution_id }}"}})
        assert ok.status_code == 200, ok.text
        assert ok.json()["rendered"] == {"a": "a", "id": "lin-0"}
        injected = await render({"execution_id": "lin-0' OR '1'='1", "template": "{{ a.v }}"})
        assert injected.status_code == 404
        huge = await render({"execution_id": "x" * 1_000_000, "template": "{{ a.v }}"})
        assert huge.status_code == 404
        undefined = await render({"execution_id": "lin-0", "template": "{{ nope.deeper }}"})
        assert undefined.status_code == 400 and "nope" in undefined.json()["detail"]
        assert (await render({"execution_id": "", "template": "x"})).status_code == 422
        assert (await render({"template": "x"})).status_code == 422
        # nothing above harmed the log or the next request
        assert await read_events(pool, schema, "lin-0") == log
        assert (await render({"execution_id": "lin-0", "template": "{{ b.v }}"})).json()["rendered"] == "b"


def test_the_migration_command_takes_the_dsn_from_a_file_never_from_argv(pg_dsn, tmp_path):
    """`python -m noetl_runtime.postgres_schema --database-url-file PATH` (docs/security.md): applies the
    migrations with the DSN the file holds; a bad file is a usage error (2) that does not echo it."""
    import os
    import subprocess
    import sys

    schema = f"noetl_{uuid.uuid4().hex[:12]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(pg_dsn + "\n")
    command = [sys.executable, "-m", "noetl_runtime.postgres_schema", "--schema", schema]
    try:
        done = subprocess.run([*command, "--database-url-file", str(dsn_file)], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"schema {schema}: applied 0001" in done.stdout
        again = subprocess.run(command, env={**env, "NOETL_DATABASE_URL_FILE": str(dsn_file)},
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and f"schema {schema}: up to date" in again.stdout, again.stderr
    finally:
        async def drop() -> None:
            conn = await asyncpg.connect(pg_dsn)
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            await conn.close()
        asyncio.run(drop())
    dsn_file.write_text("postgresql://u:hunter2@h/db\n\0")
    bad = subprocess.run([*command, "--database-url-file", str(dsn_file)], env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "NUL bytes" in bad.stderr and "hunter2" not in bad.stderr, bad.stderr
    both = subprocess.run([*command, "--database-url-file", str(dsn_file), "--database-url", pg_dsn], env=env,
                          capture_output=True, text=True, timeout=60)
    assert both.returncode == 2 and "give the DSN once" in both.stderr, both.stderr


async def test_a_quarantined_execution_shows_as_such(pg):
    """An execution the fold could only quarantine (noetl_common.engine.quarantine) is FAILED with
    `quarantined: true` in the read model, as projection.summary says; any other one says false."""
    from noetl_common.engine.quarantine import quarantine
    from noetl_common.engine.tick import iso
    pool, schema = pg
    events = scenario()
    raw = b'{"execution_id": "q", "seq": 3, "path": "tests/q", "started": 1767225600.0, "steps": 7}'
    stuck = [Event(event_id=f"q:{i}", execution_id="q", seq=i, event_type="step_started", node_name="a",
                   node_type="step", status="RUNNING", timestamp=iso(T0), time=T0) for i in range(3)]
    failed = quarantine("q", "its state cannot be read: ValidationError", T0 + 5, raw=raw).events
    projector, read = Projector(pool, schema), PostgresReadModel(pool, schema)
    await projector.apply([*events, *stuck, *failed])
    summary = await read.execution("q")
    assert summary == projection.summary([*stuck, *failed])
    assert summary["status"] == "FAILED" and summary["quarantined"] is True
    assert summary["error"] == "quarantined: its state cannot be read: ValidationError"
    assert (await read.execution("lin-0"))["quarantined"] is False
    listed = (await read.executions(ExecutionFilters(status="FAILED"), Page(limit=100)))[0]
    assert {s["execution_id"]: s["quarantined"] for s in listed} == {"retry-fail": False, "q": True}
