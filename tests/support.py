"""Helpers shared by tests of every kind: `from support import free_port`.

Importable because pyproject's pytest settings put tests/ on sys.path (`pythonpath = ["tests"]`).
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a server the test is about to start.
    Another process may take it in between; the servers tested fail loudly when that happens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_admin_token(store: "str | Path") -> str:
    """The admin token a `noetl server --store STORE` wrote beside its store on first start (it is written
    before the server listens, so once /ready answers it is there)."""
    from noetl_runtime.tokens import ADMIN_TOKEN_FILE

    return (Path(store).parent / ADMIN_TOKEN_FILE).read_text().strip()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def new_pg_token(pool: Any, schema: str, role: str = "admin") -> str:
    """A new token in a migrated cluster schema (pool or connection), as `noetl token create --postgres`."""
    import uuid

    from noetl_runtime.tokens import PostgresTokens

    token, _ = await PostgresTokens(pool, schema).create(f"test-{role}-{uuid.uuid4().hex[:8]}", role, None)
    return token


def pg_token(dsn: str, schema: str, role: str = "admin") -> str:
    """new_pg_token from synchronous code: connects, migrates the schema first, creates the token."""
    import asyncio

    import asyncpg

    from noetl_runtime.postgres_store import ensure_schema

    async def go() -> str:
        conn = await asyncpg.connect(dsn)
        try:
            await ensure_schema(conn, schema)
            return await new_pg_token(conn, schema, role)
        finally:
            await conn.close()
    return asyncio.run(go())
