"""`noetl token create|list|revoke`: API tokens of the local store, or of a cluster's Postgres (--postgres).

The token is printed once, alone on stdout (so `NOETL_API_TOKEN=$(noetl token create ...)` works); only its
SHA-256 is stored. The cluster's DSN comes from NOETL_DATABASE_URL, never the command line (argv is visible
to every local user).
"""
from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from noetl_runtime.auth import ROLES

token_app = typer.Typer(help="API tokens (bearer) of the HTTP API: create, list, revoke.", no_args_is_help=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
StoreOption = typer.Option(None, "--store", envvar="NOETL_STORE",
                           help="SQLite store of a local `noetl server` (default ~/.noetl/noetl.db).")
PostgresOption = typer.Option(False, "--postgres", help="The cluster's tokens: Postgres at NOETL_DATABASE_URL, "
                                                        "schema NOETL_DATABASE_SCHEMA (default noetl).")
_DURATION = re.compile(r"^(\d{1,6})([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(text: str, now: float) -> float | None:
    """`90d`, `12h`, `30m`, `2w`, `3600s` from now; `never` for no expiry."""
    if text.strip().lower() == "never":
        return None
    match = _DURATION.match(text.strip().lower())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"--expires {text!r}: use a duration like 90d, 12h, 30m, 2w, or 'never'")
    return now + int(match.group(1)) * _UNIT[match.group(2)]


@asynccontextmanager
async def _tokens(store: Path | None, postgres: bool) -> AsyncIterator[Any]:
    if not postgres:
        from noetl_runtime.sqlite_store import SqliteStore
        from noetl_runtime.tokens import SqliteTokens

        async with SqliteStore(store) as db:
            yield SqliteTokens(db)
        return
    import asyncpg

    from noetl_runtime.postgres_store import ensure_schema
    from noetl_runtime.tokens import PostgresTokens

    dsn = os.environ.get("NOETL_DATABASE_URL")
    if not dsn:
        raise ValueError("--postgres needs NOETL_DATABASE_URL")
    schema = os.environ.get("NOETL_DATABASE_SCHEMA", "noetl")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        await ensure_schema(pool, schema)   # the token table may be newer than the running services
        yield PostgresTokens(pool, schema)
    finally:
        await pool.close()


def _run(work: Any) -> Any:
    try:
        return asyncio.run(work)
    except (ValueError, OSError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2)
    except Exception as exc:   # the database refused (asyncpg's errors, sqlite3's): say so, no traceback
        if type(exc).__module__.split(".")[0] not in ("asyncpg", "sqlite3"):
            raise
        err.print(f"[red]error:[/] the token store refused: {type(exc).__name__}: {escape(str(exc))}")
        raise typer.Exit(2)


def _when(t: float | None) -> str:
    return "never" if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@token_app.command("create")
def create(name: str = typer.Option(..., "--name", help="A unique name (letters, digits, . _ - @)."),
           role: str = typer.Option(..., "--role", help=f"One of: {', '.join(ROLES)}."),
           expires: str = typer.Option("90d", "--expires", help="Lifetime: 90d, 12h, 2w ... or 'never'."),
           store: Optional[Path] = StoreOption, postgres: bool = PostgresOption) -> None:
    """Create a token and print it once (only its hash is kept)."""
    async def go() -> str:
        now = time.time()
        async with _tokens(store, postgres) as tokens:
            token, record = await tokens.create(name, role, parse_expiry(expires, now),
                                                created_by=f"noetl token create ({os.environ.get('USER', '?')})")
        err.print(f"created token {escape(record.name)} (id {record.id}, role {record.role}, expires "
                  f"{_when(record.expires_at)}); it is shown only now")
        return token
    print(_run(go()))


@token_app.command("list")
def list_tokens(store: Optional[Path] = StoreOption, postgres: bool = PostgresOption) -> None:
    """Every token: id, name, role, created, expires, state (never the token)."""
    async def go() -> list[Any]:
        async with _tokens(store, postgres) as tokens:
            return await tokens.list()
    now = time.time()
    for r in _run(go()):
        state = "revoked" if r.revoked_at is not None else "expired" if not r.active(now) else "active"
        print(f"{r.id}\t{r.name}\t{r.role}\t{_when(r.created_at)}\t{_when(r.expires_at)}\t{state}")


@token_app.command("revoke")
def revoke(name: str = typer.Argument(..., help="The token's name or id."),
           store: Optional[Path] = StoreOption, postgres: bool = PostgresOption) -> None:
    """Revoke a token at once (exit 1 when no active token has that name or id)."""
    async def go() -> bool:
        async with _tokens(store, postgres) as tokens:
            return await tokens.revoke(name)
    if not _run(go()):
        err.print(f"no active token named {escape(name)}")
        raise typer.Exit(1)
    print(f"revoked {name}")
