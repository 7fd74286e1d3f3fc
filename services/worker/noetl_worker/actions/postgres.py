"""`type: postgres` (DSL §2.3): the step's SQL, split into statements, run in order with asyncpg.

Each statement commits on its own (autocommit, as in the reference): a DDL step that creates a table and
then fails on a later statement leaves the table, and the error names the failing statement's index. The
credential comes from `auth`; its fields may use the reference's aliases (db_host, dbname, dsn, ...).
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from noetl_worker.actions.base import ActionError, ActionOutput, Invocation, json_cell, sql_text
from noetl_worker.auth import AuthError, ResolvedAuth, first, resolve_single
from noetl_worker.sql import split_sql

CONNECT_TIMEOUT = 30.0


async def run(inv: Invocation) -> ActionOutput:
    statements = split_sql(sql_text(inv.config, inv.data))
    if not statements:
        raise ActionError("the SQL has no statements (only comments or whitespace)")
    params = await connection_params(inv.auth, inv)
    result: dict[str, Any] = {}
    async with connect(params, inv.timeout) as conn:
        for i, statement in enumerate(statements):
            try:
                result[f"command_{i}"] = await run_statement(conn, statement)
            except asyncpg.PostgresError as exc:
                raise ActionError(f"command_{i}: {describe(exc)}", result=result) from exc
    return ActionOutput(result)


async def run_statement(conn: asyncpg.Connection, statement: str) -> dict[str, Any]:
    prepared = await conn.prepare(statement)
    records = await prepared.fetch()
    columns = [a.name for a in prepared.get_attributes()]
    rows = [{k: json_cell(v) for k, v in r.items()} for r in records]
    tag = prepared.get_statusmsg() or ""
    last = tag.rsplit(" ", 1)[-1]
    row_count = int(last) if last.isdigit() else len(rows)
    return {"status": "success", "rows": rows, "row_count": row_count, "columns": columns}


def describe(exc: asyncpg.PostgresError) -> str:
    """The database's message, then its detail and hint when it gives them (e.g. which key conflicted),
    each once: str(exc) already appends a DETAIL line, so the message is taken on its own."""
    message = (getattr(exc, "message", None) or str(exc).strip().split("\n", 1)[0]).strip() or type(exc).__name__
    extras = [str(x).strip() for x in (getattr(exc, "detail", None), getattr(exc, "hint", None)) if x]
    return message + "".join(f" ({x})" for x in extras)


async def connection_params(auth: Any, inv: Invocation) -> dict[str, Any]:
    if auth is None:
        raise ActionError("postgres needs `auth` naming a postgres credential")
    try:
        resolved = await resolve_single(auth, inv.secrets, "postgres")
    except AuthError as exc:
        raise ActionError(str(exc)) from exc
    return pg_params(resolved)


def pg_params(resolved: ResolvedAuth | None) -> dict[str, Any]:
    """asyncpg.connect keywords from credential fields (aliases accepted); explicit fields beat the dsn."""
    data = resolved.data if resolved is not None else {}
    params: dict[str, Any] = {}
    dsn = first(data, "dsn", "db_conn_string", "connection_string", "conn_string")
    if dsn:
        params["dsn"] = str(dsn)
    fields = {
        "host": first(data, "host", "db_host", "pg_host", "hostname"),
        "port": first(data, "port", "db_port", "pg_port"),
        "user": first(data, "user", "username", "db_user", "pg_user"),
        "password": first(data, "password", "db_password", "pg_password"),
        "database": first(data, "database", "dbname", "db_name", "db", "pg_database"),
        "ssl": first(data, "sslmode", "ssl"),
    }
    for key, value in fields.items():
        if value is not None:
            params[key] = int(value) if key == "port" else value
    if "dsn" not in params and "host" not in params:
        name = resolved.name if resolved is not None else None
        raise ActionError(f"credential {name!r} has no postgres connection fields "
                          f"(host/port/user/password/database or dsn)")
    return params


@contextlib.asynccontextmanager
async def connect(params: dict[str, Any], timeout: float | None) -> AsyncIterator[asyncpg.Connection]:
    """One connection per attempt: simple and always fresh (a pool per event loop is the next step if
    per-item saves ever dominate; the attempt's own timeout bounds the connect too)."""
    connect_timeout = min(timeout, CONNECT_TIMEOUT) if timeout else CONNECT_TIMEOUT
    try:
        conn = await asyncpg.connect(timeout=connect_timeout, **params)
    except asyncpg.PostgresError as exc:
        raise ActionError(f"cannot connect to postgres: {describe(exc)}") from exc
    except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
        where = params.get("host") or "the dsn's host"
        raise ActionError(f"cannot connect to postgres at {where}: {type(exc).__name__}: {exc}") from exc
    try:
        await set_json_codecs(conn)
        yield conn
    finally:
        await conn.close(timeout=5)


async def set_json_codecs(conn: asyncpg.Connection) -> None:
    """json/jsonb as Python values both ways: rows come back as dicts/lists, saves bind dicts/lists."""
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, schema="pg_catalog", encoder=encode_json, decoder=json.loads,
                                  format="text")


def encode_json(value: Any) -> str:
    """A str that already is JSON text (the reference's `{{ x | tojson }}` idiom) is stored as that JSON;
    any other value is encoded."""
    if isinstance(value, str):
        try:
            json.loads(value)
            return value
        except ValueError:
            pass
    return json.dumps(value)
