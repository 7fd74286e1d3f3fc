"""Postgres implementations of CatalogPort and CredentialPort (Kafka mode), with asyncpg.

The SQLite store (`sqlite_store`) is the embedded twin: the same behaviours, one contract suite each.
Tables live in one schema per installation (default `noetl`; tests use a schema each):

    <schema>.catalog     (path, version, content, document jsonb, created_at)   migration 0001 (query service)
    <schema>.credential  (name, type, description, secret bytea, created_at, updated_at)       migration 0002

The tables are created by the query service's migrations (`noetl_query.postgres_schema.migrate`), the only
DDL in the project; `ensure_schema` runs them, so a worker or ingest process may start first.

Credentials are encrypted at rest with Fernet (`secret_key.encrypt_json`). In a cluster every service that
reads or writes them needs the same key, so it comes from NOETL_SECRET_KEY (or the `key` argument): unlike
the embedded store there is no key file to fall back to, and a missing key is an error at first use.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from cryptography.fernet import Fernet

from noetl_common.ports import CatalogEntry, Credential
from noetl_runtime import secret_key

DEFAULT_SCHEMA = "noetl"
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

__all__ = ["DEFAULT_SCHEMA", "PostgresCatalog", "PostgresCredentials", "ensure_schema", "MissingSecretKey"]


class MissingSecretKey(RuntimeError):
    """Credentials cannot be encrypted or decrypted: NOETL_SECRET_KEY is not set."""


def _qualify(schema: str) -> str:
    # Interpolated into SQL as an identifier, so only plain names pass (the rule of noetl_query.postgres_schema).
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"invalid schema name {schema!r}: use letters, digits and _ (max 63)")
    return f'"{schema}"'


async def ensure_schema(pool: Any, schema: str = DEFAULT_SCHEMA) -> list[int]:
    """Create `schema` and apply the pending migrations (catalog, credential, the read models); returns the
    versions applied now. Safe to run from every replica at once (an advisory lock serialises them)."""
    from noetl_query.postgres_schema import migrate   # the migrations ship with the query service

    return await migrate(pool, schema)


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
        q = _qualify(schema)
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

    async def register(self, content: str, document: dict[str, Any], path: str,
                       registered_by: str | None = None) -> CatalogEntry:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(self._sql_lock, f"noetl.catalog:{self.schema}:{path}")
            row = await conn.fetchrow(self._sql_register, path, content, json.dumps(document), registered_by)
        return _entry(row)

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
        q = _qualify(schema)
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
