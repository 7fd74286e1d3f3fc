"""Postgres implementations of CatalogPort and CredentialPort (Kafka mode), with asyncpg; the pool a
service opens on NOETL_DATABASE_URL; the reading of the projected event log.

The SQLite store (`sqlite_store`) is the embedded twin: the same behaviours, one contract suite each.
Tables live in one schema per installation (default `noetl`; tests use a schema each):

    <schema>.catalog     (path, version, content, document jsonb, created_at)                  migration 0001
    <schema>.event       (event_id, execution_id, seq, body, ...), the query service projects  migration 0001
    <schema>.credential  (name, type, description, secret bytea, created_at, updated_at)       migration 0002
    <schema>.idempotency (scope, request_hash, execution_id, request, answer, created_at)     migration 0003

`PostgresExecutions` reads the query service's `execution` table for ingest's admission decisions (is an
execution known, how many are in flight); it never writes it.

The tables are created by the installation's migrations (`noetl_runtime.postgres_schema.migrate`), the only
DDL in the project; `ensure_schema` and `open_pool` run them, so any service may start first.

Credentials are encrypted at rest with Fernet (`secret_key.encrypt_json`). In a cluster every service that
reads or writes them needs the same key, so it comes from NOETL_SECRET_KEY (or the `key` argument): unlike
the embedded store there is no key file to fall back to, and a missing key is an error at first use.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

from cryptography.fernet import Fernet

from noetl_common.messages import Event
from noetl_common.ports import CatalogEntry, Claim, Credential
from noetl_common.refusals import Conflict
from noetl_runtime import secret_key
from noetl_runtime.postgres_schema import DEFAULT_SCHEMA, connection, migrate, qualify

if TYPE_CHECKING:
    from noetl_runtime.settings import Settings

__all__ = ["DEFAULT_SCHEMA", "PostgresCatalog", "PostgresCredentials", "PostgresIdempotency", "PostgresExecutions",
           "ensure_schema", "open_pool", "read_events", "MissingSecretKey"]

log = logging.getLogger("noetl.postgres")


class MissingSecretKey(RuntimeError):
    """Credentials cannot be encrypted or decrypted: NOETL_SECRET_KEY is not set."""


async def ensure_schema(pool: Any, schema: str = DEFAULT_SCHEMA) -> list[int]:
    """Create `schema` and apply the pending migrations (catalog, credential, the read models); returns the
    versions applied now. Safe to run from every replica at once (an advisory lock serialises them)."""
    return await migrate(pool, schema)


async def open_pool(settings: Settings, *, max_size: int = 10) -> Any:
    """An asyncpg pool on NOETL_DATABASE_URL, with the schema migrated (idempotent, concurrency-safe: every
    service may run it at start, whichever comes first creates the tables)."""
    import asyncpg

    if not settings.database_url:
        raise SystemExit("NOETL_DATABASE_URL is not set: this service keeps its data in Postgres")
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=max_size)
    try:
        applied = await ensure_schema(pool, settings.database_schema)
    except BaseException:
        await pool.close()
        raise
    if applied:
        log.info("migrated schema %s: %s", settings.database_schema, applied)
    return pool


# ---------------------------------------------------------------------------------------------------------
# The projected event log
# ---------------------------------------------------------------------------------------------------------
async def read_events(conn_or_pool: Any, schema: str, execution_id: str, after_seq: int = -1,
                      limit: int | None = None) -> list[Event]:
    """The execution's events as the query service projected them (every event once, in seq order; those
    with seq > after_seq, at most `limit`); [] if unknown. The read model and the render service read it."""
    sql = (f"SELECT body::text FROM {qualify(schema)}.event WHERE execution_id = $1 AND seq > $2"
           ' ORDER BY seq, event_id COLLATE "C"')
    if limit is not None:
        sql += f" LIMIT {max(0, int(limit))}"
    async with connection(conn_or_pool) as conn:
        rows = await conn.fetch(sql, execution_id, after_seq)
    return [Event.model_validate_json(body) for (body,) in rows]


# ---------------------------------------------------------------------------------------------------------
# Catalog
# ---------------------------------------------------------------------------------------------------------
def _entry(row: Mapping[str, Any]) -> CatalogEntry:
    return CatalogEntry(path=row["path"], version=row["version"], content=row["content"],
                        document=json.loads(row["document"]), created_at=row["created_at"],
                        registered_by=row.get("registered_by"))


class PostgresCatalog:
    """CatalogPort: every registration of a path gets the next version (max + 1); (path, version) never
    changes once registered."""

    def __init__(self, pool: Any, schema: str = DEFAULT_SCHEMA) -> None:
        self.pool = pool
        self.schema = schema
        q = qualify(schema)
        cols = ("path, version, content, document::text AS document,"
                " extract(epoch FROM created_at)::float8 AS created_at, registered_by")
        self._sql_lock = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
        # One statement picks the version and inserts; the lock above makes max + 1 safe under concurrency.
        self._sql_register = (
            f"INSERT INTO {q}.catalog (path, version, content, document, created_at, registered_by)"
            f" SELECT $1, COALESCE(MAX(version), 0) + 1, $2, $3::jsonb, now(), $4 FROM {q}.catalog WHERE path = $1"
            f" RETURNING {cols}")
        self._sql_latest = f"SELECT {cols} FROM {q}.catalog WHERE path = $1 ORDER BY version DESC LIMIT 1"
        self._sql_version = f"SELECT {cols} FROM {q}.catalog WHERE path = $1 AND version = $2"
        self._sql_list = f'SELECT {cols} FROM {q}.catalog ORDER BY path COLLATE "C", version'

    async def register(self, content: str, document: dict[str, Any], path: str, registered_by: str | None = None,
                       *, before_commit: Callable[[CatalogEntry], Awaitable[None]] | None = None) -> CatalogEntry:
        """`before_commit(entry)` runs inside the transaction: if it raises, the version is not registered
        (Kafka mode publishes the registration there, so a refused produce leaves no row behind)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(self._sql_lock, f"noetl.catalog:{self.schema}:{path}")
            entry = _entry(await conn.fetchrow(self._sql_register, path, content, json.dumps(document),
                                               registered_by))
            if before_commit is not None:
                await before_commit(entry)
        return entry

    async def get(self, path: str, version: int | None = None) -> CatalogEntry | None:
        """The given version, or the latest when `version` is None."""
        if version is None:
            row = await self.pool.fetchrow(self._sql_latest, path)
        else:
            row = await self.pool.fetchrow(self._sql_version, path, version)
        return _entry(row) if row is not None else None

    async def list(self) -> list[CatalogEntry]:
        """Every registered version, by path then version."""
        return [_entry(r) for r in await self.pool.fetch(self._sql_list)]


# ---------------------------------------------------------------------------------------------------------
# Credentials
# ---------------------------------------------------------------------------------------------------------
class PostgresCredentials:
    """CredentialPort: `data` is stored only as a Fernet token; `list` decrypts nothing."""

    def __init__(self, pool: Any, schema: str = DEFAULT_SCHEMA, *, key: bytes | str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.pool = pool
        self.schema = schema
        self._key = key.encode() if isinstance(key, str) else key
        self._env = env
        self._fernet: Fernet | None = None
        q = qualify(schema)
        meta = ("name, type, description, extract(epoch FROM created_at)::float8 AS created_at,"
                " extract(epoch FROM updated_at)::float8 AS updated_at")
        self._sql_put = (
            f"INSERT INTO {q}.credential AS c (name, type, description, secret, created_at, updated_at)"
            f" VALUES ($1, $2, $3, $4, now(), now()) ON CONFLICT (name) DO UPDATE SET type = excluded.type,"
            f" description = excluded.description, secret = excluded.secret,"
            f" updated_at = GREATEST(excluded.updated_at, c.updated_at) RETURNING {meta}")
        self._sql_get = f"SELECT {meta}, secret FROM {q}.credential WHERE name = $1"
        self._sql_list = f'SELECT {meta} FROM {q}.credential ORDER BY name COLLATE "C"'
        self._sql_delete = f"DELETE FROM {q}.credential WHERE name = $1"

    def _crypto(self) -> Fernet:
        # Resolved lazily: listing and deleting need no key, and a worker that never reads a credential
        # can run without one.
        if self._fernet is None:
            key = self._key
            if not key:
                env = os.environ if self._env is None else self._env
                key = env.get(secret_key.ENV_VAR, "").strip().encode() or None
            if not key:
                raise MissingSecretKey(f"{secret_key.ENV_VAR} is not set: credentials in Postgres are encrypted "
                                       "with it, and every service that reads or writes them needs the same key")
            self._fernet = Fernet(key)   # a malformed key fails here, clearly
        return self._fernet

    async def put(self, name: str, type: str, data: dict[str, Any], description: str | None = None) -> Credential:
        """Create or replace by name (created_at is kept on replace)."""
        token = secret_key.encrypt_json(self._crypto(), data)
        row = await self.pool.fetchrow(self._sql_put, name, type, description, token)
        return Credential(data=dict(data), **dict(row))

    async def get(self, name: str) -> Credential | None:
        row = await self.pool.fetchrow(self._sql_get, name)
        if row is None:
            return None
        fields = dict(row)
        token = fields.pop("secret")
        return Credential(data=secret_key.decrypt_json(self._crypto(), bytes(token)), **fields)

    async def list(self) -> list[Credential]:
        """All credentials by name, with `data` emptied."""
        return [Credential(data={}, **dict(r)) for r in await self.pool.fetch(self._sql_list)]

    async def delete(self, name: str) -> bool:
        return await self.pool.execute(self._sql_delete, name) != "DELETE 0"


# ---------------------------------------------------------------------------------------------------------
# Idempotent submission and admission
# ---------------------------------------------------------------------------------------------------------
class PostgresIdempotency:
    """IdempotencyPort: one row per scope (migration 0003), kept."""

    def __init__(self, pool: Any, schema: str = DEFAULT_SCHEMA) -> None:
        self.pool = pool
        q = qualify(schema)
        cols = "scope, request_hash, execution_id, request::text AS request, answer::text AS answer, created_at"
        self._sql_get = f"SELECT {cols} FROM {q}.idempotency WHERE scope = $1"
        self._sql_owner = f"SELECT scope FROM {q}.idempotency WHERE execution_id = $1"
        # ON CONFLICT DO NOTHING on either unique column: the caller then tells the two cases apart
        self._sql_claim = (f"INSERT INTO {q}.idempotency (scope, request_hash, execution_id, request, answer,"
                           f" created_at) VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6) ON CONFLICT DO NOTHING"
                           f" RETURNING scope")

    async def get(self, scope: str) -> Claim | None:
        row = await self.pool.fetchrow(self._sql_get, scope)
        if row is None:
            return None
        fields = dict(row)
        return Claim(**{**fields, "request": json.loads(fields["request"]), "answer": json.loads(fields["answer"])})

    async def claim(self, claim: Claim) -> Claim | None:
        inserted = await self.pool.fetchval(self._sql_claim, claim.scope, claim.request_hash, claim.execution_id,
                                            json.dumps(claim.request), json.dumps(claim.answer), claim.created_at)
        if inserted is not None:
            return None
        existing = await self.get(claim.scope)
        if existing is not None:
            return existing
        raise Conflict(f"execution_id {claim.execution_id!r} already names another execution")


class PostgresExecutions:
    """What ingest's admission reads from the query service's `execution` table (migration 0001)."""

    def __init__(self, pool: Any, schema: str = DEFAULT_SCHEMA) -> None:
        self.pool = pool
        q = qualify(schema)
        self._sql_known = f"SELECT 1 FROM {q}.execution WHERE execution_id = $1"
        self._sql_seen = f"SELECT execution_id FROM {q}.execution WHERE execution_id = ANY($1::text[])"
        # top-level and child executions alike: a child takes a worker slot like its parent
        self._sql_running = f"SELECT count(*) FROM {q}.execution WHERE status IN ('PENDING', 'RUNNING')"

    async def known(self, execution_id: str) -> bool:
        return await self.pool.fetchval(self._sql_known, execution_id) is not None

    async def seen(self, execution_ids: Collection[str]) -> set[str]:
        if not execution_ids:
            return set()
        return {r["execution_id"] for r in await self.pool.fetch(self._sql_seen, list(execution_ids))}

    async def running(self) -> int:
        return int(await self.pool.fetchval(self._sql_running))
