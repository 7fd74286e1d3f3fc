"""noetl_runtime.postgres_store against a real Postgres (NOETL_TEST_PG_DSN): the catalog and credential
behaviours of tests/unit/test_sqlite_store.py, plus what only a shared database has (concurrent
registrations, a second service with the same key). Each test has a schema of its own, dropped at the end.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any, AsyncIterator

import pytest
from cryptography.fernet import Fernet

asyncpg = pytest.importorskip("asyncpg")

from noetl_runtime import secret_key  # noqa: E402
from noetl_runtime.postgres_store import (  # noqa: E402
    MissingSecretKey, PostgresCatalog, PostgresCredentials, ensure_schema,
)

pytestmark = pytest.mark.postgres

SECRET = "s3cr3t-Pa55word-that-must-not-leak"


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[tuple[Any, str]]:
    schema = f"noetl_{uuid.uuid4().hex[:12]}"
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=8)
    try:
        assert 2 in await ensure_schema(pool, schema)
        assert await ensure_schema(pool, schema) == []      # a second service starting: nothing to do
        yield pool, schema
    finally:
        await pool.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await pool.close()


@pytest.fixture
def key() -> bytes:
    return Fernet.generate_key()


@pytest.fixture
def catalog(pg: tuple[Any, str]) -> PostgresCatalog:
    return PostgresCatalog(*pg)


@pytest.fixture
def creds(pg: tuple[Any, str], key: bytes) -> PostgresCredentials:
    return PostgresCredentials(*pg, key=key)


# ---------------------------------------------------------------------------------------------- catalog
async def test_catalog_versions_increment_per_path(catalog: PostgresCatalog) -> None:
    e1 = await catalog.register("v: 1", {"v": 1}, "a/b")
    e2 = await catalog.register("v: 2", {"v": 2, "nested": {"l": [1, "é", None]}}, "a/b")
    other = await catalog.register("x: 1", {"x": 1}, "c")
    assert (e1.version, e2.version, other.version) == (1, 2, 1)
    assert e2.created_at >= e1.created_at > 0

    latest = await catalog.get("a/b")
    assert latest == e2
    assert latest.document == {"v": 2, "nested": {"l": [1, "é", None]}} and latest.content == "v: 2"
    first = await catalog.get("a/b", 1)
    assert first is not None and first.document == {"v": 1}
    assert await catalog.get("a/b", 3) is None
    assert await catalog.get("missing") is None
    assert [(e.path, e.version) for e in await catalog.list()] == [("a/b", 1), ("a/b", 2), ("c", 1)]


async def test_catalog_concurrent_registrations_get_distinct_versions(pg: tuple[Any, str]) -> None:
    # Two ingest replicas registering the same path at once must not collide on (path, version).
    catalogs = [PostgresCatalog(*pg) for _ in range(2)]
    entries = await asyncio.gather(*(catalogs[i % 2].register(f"n: {i}", {"n": i}, "race") for i in range(12)))
    assert sorted(e.version for e in entries) == list(range(1, 13))
    assert (await catalogs[0].get("race")).version == 12


async def test_catalog_survives_a_new_pool(pg_dsn: str, pg: tuple[Any, str]) -> None:
    _, schema = pg
    await PostgresCatalog(*pg).register("k: v", {"k": "v"}, "p")
    other = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        assert (await PostgresCatalog(other, schema).register("k: w", {"k": "w"}, "p")).version == 2
    finally:
        await other.close()


# ------------------------------------------------------------------------------------------ credentials
async def test_credentials_round_trip_and_upsert(creds: PostgresCredentials) -> None:
    c = await creds.put("pg", "postgres", {"user": "u", "password": SECRET}, "local db")
    assert c.data["password"] == SECRET
    got = await creds.get("pg")
    assert got is not None and got.type == "postgres" and got.data == {"user": "u", "password": SECRET}
    assert got.description == "local db" and got.created_at == c.created_at > 0

    updated = await creds.put("pg", "postgres", {"user": "u2", "password": "other"})
    assert updated.created_at == got.created_at and updated.updated_at >= got.updated_at
    got = await creds.get("pg")
    assert got is not None and got.data == {"user": "u2", "password": "other"} and got.description is None
    assert await creds.get("missing") is None


async def test_credentials_list_has_no_data(creds: PostgresCredentials) -> None:
    await creds.put("b", "bearer", {"token": SECRET})
    await creds.put("a", "basic", {"username": "x", "password": SECRET})
    listed = await creds.list()
    assert [(c.name, c.type, c.data) for c in listed] == [("a", "basic", {}), ("b", "bearer", {})]


async def test_credentials_delete(creds: PostgresCredentials) -> None:
    await creds.put("tok", "bearer", {"token": SECRET})
    assert await creds.delete("tok") is True
    assert await creds.get("tok") is None
    assert await creds.delete("tok") is False
    assert await creds.list() == []


async def test_credentials_encrypted_at_rest(pg: tuple[Any, str], creds: PostgresCredentials, key: bytes) -> None:
    pool, schema = pg
    await creds.put("api", "bearer", {"token": SECRET}, "an api")
    row = await pool.fetchrow(f'SELECT * FROM "{schema}".credential WHERE name = $1', "api")
    assert row is not None and row["type"] == "bearer"
    as_text = " ".join(str(v) for v in row.values())
    assert SECRET not in as_text
    assert SECRET.encode() not in bytes(row["secret"])
    assert secret_key.decrypt_json(Fernet(key), bytes(row["secret"])) == {"token": SECRET}
    dump = await pool.fetchval(f'SELECT string_agg(t::text, \'|\') FROM "{schema}".credential AS t')
    assert SECRET not in dump

    # Another service (a worker) with the same key, from the environment, reads it back.
    reader = PostgresCredentials(*pg, env={secret_key.ENV_VAR: key.decode()})
    got = await reader.get("api")
    assert got is not None and got.data == {"token": SECRET}


async def test_credentials_wrong_or_missing_key(pg: tuple[Any, str], creds: PostgresCredentials) -> None:
    await creds.put("api", "bearer", {"token": SECRET})
    wrong = PostgresCredentials(*pg, key=Fernet.generate_key())
    with pytest.raises(secret_key.InvalidToken):
        await wrong.get("api")

    keyless = PostgresCredentials(*pg, env={})
    assert [c.name for c in await keyless.list()] == ["api"]          # listing decrypts nothing
    with pytest.raises(MissingSecretKey, match="NOETL_SECRET_KEY"):
        await keyless.get("api")
    with pytest.raises(MissingSecretKey):
        await keyless.put("x", "bearer", {"token": SECRET})
    assert await keyless.delete("api") is True


def test_schema_name_is_checked() -> None:
    with pytest.raises(ValueError, match="invalid schema name"):
        PostgresCatalog(None, 'x"; DROP TABLE y; --')
    with pytest.raises(ValueError, match="invalid schema name"):
        PostgresCredentials(None, "1bad")
