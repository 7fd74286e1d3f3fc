"""`type: duckdb` (DSL §2.3): the step's SQL run in-process, in a thread (DuckDB calls block).

`database` names a file (shared by steps that name the same one) or, by default, `:memory:` (private to
the attempt). An `auth` alias map becomes one DuckDB SECRET per alias, best effort: a secret type DuckDB
cannot create here (e.g. its extension is not installed and cannot be downloaded) is noted in the step log
and the statements run anyway, so the statement that needs it reports the real error.
A timeout or cancellation interrupts the running query (`interrupt()`), so the thread does not run on.
"""
from __future__ import annotations

import asyncio
from typing import Any

from noetl_worker.actions.base import ActionError, ActionOutput, Invocation, json_cell, sql_text
from noetl_worker.auth import AuthError, ResolvedAuth, first, resolve_auth
from noetl_worker.sql import split_sql


async def run(inv: Invocation) -> ActionOutput:
    statements = split_sql(sql_text(inv.config, inv.data))
    if not statements:
        raise ActionError("the SQL has no statements (only comments or whitespace)")
    secrets_sql = await secret_statements(inv)
    database = str(inv.config.get("database") or inv.data.get("database") or ":memory:")
    result = await run_in_thread(database, secrets_sql, statements, inv)
    return ActionOutput(result)


async def run_in_thread(database: str, setup: list[tuple[str, str]], statements: list[str],
                        inv: Invocation) -> dict[str, Any]:
    """Run `setup` (best effort, as (alias, sql)) then `statements` in a worker thread, interruptibly."""
    holder: dict[str, Any] = {}
    future = asyncio.get_running_loop().run_in_executor(None, _run_sync, database, setup, statements, holder)
    try:
        outcome = await asyncio.shield(future)
    except asyncio.CancelledError:
        con = holder.get("con")
        holder["cancelled"] = True
        if con is not None:
            con.interrupt()
        raise
    for line in holder.get("notes", []):
        inv.note(line)
    if isinstance(outcome, ActionError):
        raise outcome
    return outcome


def _run_sync(database: str, setup: list[tuple[str, str]], statements: list[str],
              holder: dict[str, Any]) -> Any:
    import duckdb  # heavy (~0.1 s): only workers that run DuckDB steps pay for it

    result: dict[str, Any] = {}
    try:
        con = duckdb.connect(database)
    except duckdb.Error as exc:
        return ActionError(f"cannot open duckdb database {database!r}: {exc}")
    holder["con"] = con
    notes: list[str] = holder.setdefault("notes", [])
    try:
        for alias, sql in setup:
            try:
                con.execute(sql)
            except duckdb.Error as exc:
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                notes.append(f"duckdb secret {alias!r} not created: {first_line}")
        for i, statement in enumerate(statements):
            if holder.get("cancelled"):
                return ActionError("cancelled")
            try:
                cur = con.execute(statement)
                columns = [d[0] for d in cur.description] if cur.description else []
                rows = [dict(zip(columns, map(json_cell, r))) for r in cur.fetchall()] if columns else []
            except duckdb.Error as exc:
                return ActionError(f"command_{i}: {str(exc).strip()}", result=result)
            result[f"command_{i}"] = {"status": "success", "rows": rows, "row_count": len(rows),
                                      "columns": columns}
        return result
    finally:
        con.close()


async def secret_statements(inv: Invocation) -> list[tuple[str, str]]:
    """One CREATE OR REPLACE SECRET per `auth` alias (a single credential gets its own name as alias)."""
    try:
        resolved = await resolve_auth(inv.auth, inv.secrets)
    except AuthError as exc:
        raise ActionError(str(exc)) from exc
    if resolved is None:
        return []
    if isinstance(resolved, ResolvedAuth):
        resolved = {resolved.name or "default": resolved}
    out = []
    for alias, auth in resolved.items():
        sql = secret_sql(alias, auth)
        if sql is None:
            inv.note(f"duckdb secret {alias!r} skipped: credential type {auth.service!r} has no DuckDB "
                     f"secret type (postgres, hmac/gcs, s3)")
        else:
            out.append((alias, sql))
    return out


def secret_sql(alias: str, auth: ResolvedAuth) -> str | None:
    d = auth.data
    if auth.service in ("postgres", "postgresql", "pg"):
        fields = {"HOST": first(d, "host", "db_host", "pg_host"), "PORT": first(d, "port", "db_port"),
                  "DATABASE": first(d, "database", "dbname", "db_name"),
                  "USER": first(d, "user", "username", "db_user"),
                  "PASSWORD": first(d, "password", "db_password")}
        kind = "postgres"
    elif auth.service in ("hmac", "gcs", "s3", "r2"):
        kind = {"hmac": "gcs", "gcs": "gcs", "s3": "s3", "r2": "r2"}[auth.service]
        fields = {"KEY_ID": first(d, "key_id", "access_key_id", "aws_access_key_id"),
                  "SECRET": first(d, "secret_key", "secret", "secret_access_key", "aws_secret_access_key"),
                  "REGION": first(d, "region"), "ENDPOINT": first(d, "endpoint"),
                  "SESSION_TOKEN": first(d, "session_token"), "ACCOUNT_ID": first(d, "account_id")}
        scope = auth.scope or first(d, "scope")
        if scope:
            fields["SCOPE"] = scope
    else:
        return None
    parts = [f"TYPE {kind}"] + [f"{k} {_literal(v)}" for k, v in fields.items() if v is not None]
    return f"CREATE OR REPLACE SECRET {_ident(alias)} ({', '.join(parts)})"


def _literal(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
