"""The stores behind the front door, on real databases: the IdempotencyPort of SQLite and of Postgres (one
contract, both implementations), Postgres' catalog registration rolled back by a failed `before_commit`
(Kafka mode's refused produce), and the admission reads of the read model (`PostgresExecutions`) feeding
`InFlight`.
"""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from noetl_common.ports import Claim
from noetl_common.refusals import Conflict, Overloaded, TooLarge
from noetl_ingest.admission import InFlight
from noetl_runtime.sqlite_store import SqliteStore

asyncpg = pytest.importorskip("asyncpg")

from noetl_runtime.postgres_store import (  # noqa: E402
    PostgresCatalog, PostgresExecutions, PostgresIdempotency, ensure_schema,
)


async def _schema(pg_dsn: str) -> tuple[Any, str]:
    schema = f"noetl_{uuid.uuid4().hex[:12]}"
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=8)
    assert 3 in await ensure_schema(pool, schema)   # migration 0003: the idempotency table
    return pool, schema


async def _drop(pool: Any, schema: str) -> None:
    await pool.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await pool.close()


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[tuple[Any, str]]:
    pool, schema = await _schema(pg_dsn)
    try:
        yield pool, schema
    finally:
        await _drop(pool, schema)


@pytest.fixture(params=["sqlite", "postgres"])
async def idempotency(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "sqlite":
        store = SqliteStore(tmp_path / "noetl.db")
        yield store.idempotency
        store.close()
    else:
        pool, schema = await _schema(request.getfixturevalue("pg_dsn"))
        try:
            yield PostgresIdempotency(pool, schema)
        finally:
            await _drop(pool, schema)


def claim(scope: str, execution_id: str, digest: str = "h1", **request: Any) -> Claim:
    return Claim(scope=scope, request_hash=digest, execution_id=execution_id,
                 request={"path": "p", "parameters": {"ü": "ø", "n": [1, None]}, **request},
                 answer={"execution_id": execution_id, "path": "p", "version": "1"}, created_at=1767225600.25)


@pytest.mark.postgres
async def test_first_claim_records_and_later_ones_see_it(idempotency: Any) -> None:
    first = claim("key:k1", "e1")
    assert await idempotency.get("key:k1") is None
    assert await idempotency.claim(first) is None
    assert await idempotency.get("key:k1") == first
    # the same scope again (another body, another id): the recorded claim, unchanged
    assert await idempotency.claim(claim("key:k1", "e2", "h2")) == first
    assert await idempotency.get("key:k1") == first


@pytest.mark.postgres
async def test_an_execution_id_belongs_to_one_scope(idempotency: Any) -> None:
    assert await idempotency.claim(claim("id:e1", "e1")) is None
    with pytest.raises(Conflict, match="e1"):
        await idempotency.claim(claim("key:other", "e1"))
    assert await idempotency.get("key:other") is None


@pytest.mark.postgres
async def test_concurrent_claims_of_one_scope_record_one(idempotency: Any) -> None:
    results = await asyncio.gather(*(idempotency.claim(claim("key:race", f"e{i}")) for i in range(10)))
    winners = [r for r in results if r is None]
    assert len(winners) == 1
    recorded = await idempotency.get("key:race")
    assert recorded is not None and all(r == recorded for r in results if r is not None)


@pytest.mark.postgres
async def test_hostile_scopes_are_data(idempotency: Any) -> None:
    for scope in ("key:'; DROP TABLE idempotency; --", "key:" + "x" * 255, "key:%_\\"):
        eid = uuid.uuid4().hex
        assert await idempotency.claim(claim(scope, eid)) is None
        got = await idempotency.get(scope)
        assert got is not None and got.execution_id == eid
    assert await idempotency.get("key:%") is None   # no pattern matching anywhere


@pytest.mark.postgres
async def test_a_failed_before_commit_leaves_no_catalog_row(pg: tuple[Any, str]) -> None:
    catalog = PostgresCatalog(*pg)

    async def refuse(entry: Any) -> None:
        assert entry.version == 1   # numbered inside the transaction
        raise TooLarge("over the topic's limit")
    with pytest.raises(TooLarge):
        await catalog.register("v: 1", {"v": 1}, "big/one", before_commit=refuse)
    assert await catalog.get("big/one") is None and await catalog.list() == []
    published: list[int] = []

    async def publish(entry: Any) -> None:
        published.append(entry.version)
    entry = await catalog.register("v: 1", {"v": 1}, "big/one", before_commit=publish)
    assert entry.version == 1 and published == [1] and (await catalog.get("big/one")) == entry


async def _execution(pool: Any, schema: str, eid: str, status: str) -> None:
    await pool.execute(f'INSERT INTO "{schema}".execution (execution_id, status, last_seq, event_count)'
                       " VALUES ($1, $2, 0, 1)", eid, status)


@pytest.mark.postgres
async def test_in_flight_from_the_read_model(pg: tuple[Any, str]) -> None:
    pool, schema = pg
    executions = PostgresExecutions(pool, schema)
    for i, status in enumerate(["RUNNING", "PENDING", "COMPLETED", "FAILED"]):
        await _execution(pool, schema, f"x{i}", status)
    assert await executions.running() == 2
    assert await executions.known("x2") and not await executions.known("nope")
    assert await executions.seen(["x0", "x3", "nope"]) == {"x0", "x3"} and await executions.seen([]) == set()

    now = [0.0]
    bound = InFlight(4, executions.running, executions.seen, refresh=0.5, clock=lambda: now[0])
    await bound.admit()
    bound.accepted("a1")              # accepted here, not projected yet: counted on top of the 2
    await bound.admit()
    bound.accepted("a2")
    with pytest.raises(Overloaded) as refused:
        await bound.admit()           # 2 running + 2 pending = 4 = the bound
    assert refused.value.retry_after >= 1 and bound.refused == 1
    await _execution(pool, schema, "a1", "COMPLETED")   # a1 was projected, and is done already
    now[0] = 1.0                                         # the next refresh
    assert await bound.estimate() == 3
    await bound.admit()
    bound.release()                                      # a start that failed gives its place back
    assert await bound.estimate() == 3
    now[0] = 700.0                                       # a2 never showed up (lost): forgotten
    assert await bound.estimate() == 2


async def test_no_bound_and_concurrent_admissions() -> None:
    async def running() -> int:
        return 0

    async def seen(ids: Any) -> set[str]:
        return set()
    unbounded = InFlight(0, running, seen)
    for _ in range(1000):
        await unbounded.admit()
    bounded = InFlight(3, running, seen)
    # admissions in progress count: three taken before any is accepted, the fourth refused
    for _ in range(3):
        await bounded.admit()
    with pytest.raises(Overloaded):
        await bounded.admit()
