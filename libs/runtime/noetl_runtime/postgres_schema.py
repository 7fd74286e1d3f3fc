"""Schema migrations of the installation's Postgres database: the catalog and the credentials (ingest,
workers) and the read models the query service projects (executions, events).

Migrations are plain SQL files `migrations/NNNN_name.sql`, applied in number order, each at most once per
schema, recorded in `<schema>.schema_migrations`. The files use unqualified names: they run with
`search_path` set to the target schema, so one set of files serves any schema name (tests use a schema per
test, installations default to `noetl`).

`migrate()` is safe to run concurrently (several replicas starting, the Helm hook Job racing a pod): it
takes a transaction-scoped advisory lock derived from the schema name, then applies every pending file in
that same transaction. A second caller waits for the lock and then finds nothing to do. Either every
pending migration is applied or none is.

    NOETL_DATABASE_URL=postgresql://... python -m noetl_runtime.postgres_schema [--schema noetl]
    python -m noetl_runtime.postgres_schema --database-url-file /run/secrets/dsn [--schema noetl]

(`--database-url DSN` works too, but argv is readable by every local user: prefer the two above.)
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator

import asyncpg

from noetl_runtime.dsn_file import read_dsn_file

DEFAULT_SCHEMA = "noetl"
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_MIGRATION_FILE = re.compile(r"^(\d{4})_([A-Za-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    """The recorded migrations disagree with the files (an applied file was edited, or one is missing)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def check_schema(schema: str) -> str:
    """The schema name, validated: it is interpolated into SQL as an identifier, so only plain names pass."""
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"invalid schema name {schema!r}: use letters, digits and _ (max 63)")
    return schema


def qualify(schema: str) -> str:
    """The quoted schema name for SQL text (`"noetl"`)."""
    return '"' + check_schema(schema) + '"'


def migrations() -> list[Migration]:
    """The migration files shipped with this package, in number order."""
    found: list[Migration] = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a number: {versions}")
    return found


@asynccontextmanager
async def connection(conn_or_pool: Any) -> AsyncIterator[asyncpg.Connection]:
    """A connection from a pool (acquired for the block), or the connection itself."""
    if isinstance(conn_or_pool, asyncpg.Pool):
        async with conn_or_pool.acquire() as conn:
            yield conn
    else:
        yield conn_or_pool


async def migrate(conn_or_pool: Any, schema: str = DEFAULT_SCHEMA) -> list[int]:
    """Create `schema` if needed and apply the pending migrations; returns the versions applied now."""
    q = qualify(schema)
    files = migrations()
    async with connection(conn_or_pool) as conn, conn.transaction():
        # Serialises migrators of this schema (also CREATE SCHEMA IF NOT EXISTS, which races otherwise). The
        # key keeps the name of the module's first home, so a replica of an older release locks the same key.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('noetl_query.migrate:' || $1, 0))",
                           schema)
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q}")
        await conn.execute(f"""CREATE TABLE IF NOT EXISTS {q}.schema_migrations (
            version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())""")
        applied = {r["version"]: r for r in await conn.fetch(f"SELECT version, name, checksum FROM {q}.schema_migrations")}
        known = {m.version for m in files}
        missing = sorted(set(applied) - known)
        if missing:
            raise MigrationError(f"schema {schema} has migrations {missing} that this version does not know "
                                 "(a newer release migrated it?)")
        done: list[int] = []
        for m in files:
            if m.version in applied:
                if applied[m.version]["checksum"] != m.checksum:
                    raise MigrationError(f"migration {m.version:04d}_{m.name} was edited after it was applied "
                                         f"to schema {schema}; add a new migration instead")
                continue
            await conn.execute(f"SET LOCAL search_path TO {q}")
            await conn.execute(m.sql)
            await conn.execute(f"INSERT INTO {q}.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                               m.version, m.name, m.checksum)
            done.append(m.version)
        return done


async def _main(database_url: str, schema: str) -> list[int]:
    conn = await asyncpg.connect(database_url)
    try:
        return await migrate(conn, schema)
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m noetl_runtime.postgres_schema",
                                     description="Apply the installation's Postgres migrations.")
    parser.add_argument("--database-url", default=os.environ.get("NOETL_DATABASE_URL"),
                        help="asyncpg DSN (default: $NOETL_DATABASE_URL; prefer it or --database-url-file: "
                             "a command line is readable by every local user)")
    parser.add_argument("--database-url-file", default=os.environ.get("NOETL_DATABASE_URL_FILE"),
                        metavar="PATH", help="a file holding the DSN (default: $NOETL_DATABASE_URL_FILE)")
    parser.add_argument("--schema", default=os.environ.get("NOETL_DATABASE_SCHEMA", DEFAULT_SCHEMA),
                        help="target schema (default: $NOETL_DATABASE_SCHEMA or noetl)")
    args = parser.parse_args(argv)
    if args.database_url_file:
        typed = [a for a in (argv if argv is not None else sys.argv[1:])
                 if a == "--database-url" or a.startswith("--database-url=")]
        if typed:    # the file wins over an exported NOETL_DATABASE_URL, not over a typed DSN
            parser.error("give the DSN once: --database-url or --database-url-file, not both")
        try:
            args.database_url = read_dsn_file(args.database_url_file)
        except ValueError as exc:
            parser.error(str(exc))
    if not args.database_url:
        parser.error("NOETL_DATABASE_URL, --database-url-file or --database-url is required")
    try:
        check_schema(args.schema)
    except ValueError as exc:
        parser.error(str(exc))
    applied = asyncio.run(_main(args.database_url, args.schema))
    print(f"schema {args.schema}: " + (f"applied {', '.join(f'{v:04d}' for v in applied)}" if applied
                                         else "up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
