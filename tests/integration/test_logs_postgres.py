"""Step output (GET /api/executions/{id}/logs) in the Postgres read model, against a real Postgres: the
projected events give exactly what `noetl_common.attempt_logs` says of the same log, and what the embedded
SQLite read model gives, for every filter and page; the partial index of migration 0006 serves the query;
the projector's cache holds no output."""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

asyncpg = pytest.importorskip("asyncpg")

from noetl_common.attempt_logs import CUT_MARKER, attempt_logs, log_item  # noqa: E402
from noetl_common.messages import Event  # noqa: E402
from noetl_common.simulate import Outcome, Simulation  # noqa: E402
from noetl_query.handlers import LogFilters, LogPage  # noqa: E402
from noetl_query.postgres_reads import LOG_EVENTS_SQL, PostgresReadModel  # noqa: E402
from noetl_query.projector import Projector  # noqa: E402
from noetl_query.sqlite_reads import SqliteReadModel  # noqa: E402
from noetl_runtime.postgres_schema import migrate  # noqa: E402
from noetl_runtime.sqlite_store import SqliteStore  # noqa: E402

from step_logs import RETRIED_AND_ITERATED  # noqa: E402

pytestmark = pytest.mark.postgres

HOSTILE = ["nul\x00inside\n", "é\u202e\ufffd bidi\n", "x" * 70_000, "a" + CUT_MARKER.format(99) + "z",
           "\\u0000 escaped-looking\n", '{"json": "looking"}\n', "\r\n\t\x1b[31mred\x1b[0m\n"]


def worker(cmd: Any) -> Outcome:
    text = HOSTILE[(cmd.attempt * 3 + (cmd.index or 0)) % len(HOSTILE)]
    if cmd.step == "flaky" and cmd.attempt < 2:
        return Outcome(ok=False, error="ValueError: \x00first", log=text)
    if cmd.index == 1 and cmd.attempt == 1:
        return Outcome(ok=False, error="boom", log=None)      # a failure without output is listed too
    return Outcome(result=1, log=text if cmd.index != 2 else "")


def events(execution_id: str) -> list[Event]:
    sim = Simulation(worker)
    sim.start(RETRIED_AND_ITERATED, execution_id=execution_id)
    sim.run()
    return sim.events


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[tuple[Any, str]]:
    schema = f"noetl_{uuid.uuid4().hex[:12]}"
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    try:
        await migrate(pool, schema)
        yield pool, schema
    finally:
        await pool.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await pool.close()


FILTERS = [LogFilters(), LogFilters(step="flaky"), LogFilters(step="each"), LogFilters(step="each", index=1),
           LogFilters(attempt=2), LogFilters(step="nope"), LogFilters(step="each", attempt=1, index=0)]


async def test_postgres_and_sqlite_answer_what_the_core_says(pg, tmp_path: Path) -> None:
    pool, schema = pg
    log = events("ex-1")
    other = events("ex-2")                    # another execution's logs never leak into this one's
    projector = Projector(pool, schema)
    for start in range(0, len(log), 5):       # batches split the attempts anywhere
        await projector.apply(log[start:start + 5] + other[start:start + 5])
    store = SqliteStore(tmp_path / "noetl.db")
    try:
        await store.append_events(log + other)
        postgres, sqlite = PostgresReadModel(pool, schema), SqliteReadModel(store)
        assert len(attempt_logs(log)) == 5    # flaky 1 (failed), flaky 2, each 0, each 1 failed, each 1 again
        for filters in FILTERS:
            expected = attempt_logs(log, filters.step, filters.attempt, filters.index)
            for limit, offset in ((50, 0), (2, 1), (1, 4), (3, 10)):
                page = LogPage(limit=limit, offset=offset)
                for read in (postgres, sqlite):
                    found, total = await read.attempt_logs("ex-1", filters, page)
                    assert total == len(expected), (read, filters)
                    assert [log_item(e) for e in found] == expected[offset:offset + limit], (read, filters, page)
        assert await postgres.attempt_logs("nope", LogFilters(), LogPage()) is None
        assert await sqlite.attempt_logs("nope", LogFilters(), LogPage()) is None
    finally:
        store.close()
    items = attempt_logs(log)
    assert items[0]["error"] == "ValueError: \ufffdfirst" and items[0]["truncated"]      # NUL shown as U+FFFD
    assert [i["output"] for i in items if i["index"] == 1 and i["attempt"] == 2] == ["nul\ufffdinside\n"]


async def test_the_partial_index_serves_the_query_and_the_cache_holds_no_output(pg) -> None:
    pool, schema = pg
    projector = Projector(pool, schema)
    await projector.apply(events("ex-1")[:-1])      # still running: its log stays cached
    assert projector._cache["ex-1"] and all("log" not in (e.meta or {}) for e in projector._cache["ex-1"])
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")   # a tiny table: ask whether the index CAN serve
        plan = "\n".join(r[0] for r in await conn.fetch(
            f'EXPLAIN SELECT count(*) FROM "{schema}".event WHERE execution_id = $1 AND {LOG_EVENTS_SQL}', "ex-1"))
    assert "event_attempt_log" in plan, plan


async def test_the_cluster_query_service_serves_the_route_to_a_viewer(pg) -> None:
    """`python -m noetl_query`'s app (the cluster's query role) over the projection, with real tokens."""
    pytest.importorskip("fastapi")
    import httpx

    from noetl_query.__main__ import create_service_app
    from noetl_runtime.auth import Authenticator
    from noetl_runtime.tokens import PostgresTokens
    from support import bearer, new_pg_token

    class Consumer:
        stats = dict.fromkeys(("records", "events", "dead_letters", "batches", "retries"), 0)

        @staticmethod
        def not_ready() -> None:
            return None

    pool, schema = pg
    log = events("ex-1")
    await Projector(pool, schema).apply(log)
    app = create_service_app(PostgresReadModel(pool, schema), Consumer(), Authenticator(PostgresTokens(pool, schema)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://query") as api:
        viewer = bearer(await new_pg_token(pool, schema, "viewer"))
        response = await api.get("/api/executions/ex-1/logs", params={"step": "each"}, headers=viewer)
        assert response.status_code == 200, response.text
        assert response.json() == {"execution_id": "ex-1", "items": attempt_logs(log, step="each")}
        assert response.headers["X-Total-Count"] == "3"
        assert (await api.get("/api/executions/ex-1/logs")).status_code == 401          # no token
        assert (await api.get("/api/executions/nope/logs", headers=viewer)).status_code == 404
        assert (await api.get("/api/executions/ex-1/logs", params={"attempt": 2**31}, headers=viewer)).status_code == 422
