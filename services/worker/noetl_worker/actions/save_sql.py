"""postgres and duckdb saves: rows written with bound parameters, never string-pasted values (DSL §2.7).

Values keep their types: the INSERT is prepared first, and each value is fitted to the type postgres
infers for its column (a template that rendered "42" still fills an INT column, a number fills a TEXT
one, dicts/lists go to json/jsonb as JSON, None is NULL). `mode: upsert` with `key` adds
`ON CONFLICT (key) DO UPDATE` of the other columns, so a redelivered save writes the same row again.

Identifiers follow SQL's own rule: a plain name folds to lower case (as if written unquoted), a name in
double quotes is kept exactly; both are then quoted, so no name can inject SQL.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import json
import re
import shutil
from collections.abc import Iterator
from typing import Any

import asyncpg
from noetl_runtime.settings import StepSettings

from noetl_worker.actions.base import ActionError, Invocation
from noetl_worker.actions.duckdb import checked_database, confine, spill_folder
from noetl_worker.actions.duckdb import connect as duckdb_connect
from noetl_worker.actions.postgres import connect, describe, pg_params
from noetl_worker.auth import AuthError, resolve_single
from noetl_worker.sql import split_sql

_INT = {"int2", "int4", "int8", "oid"}
_FLOAT = {"float4", "float8"}
_TEXT = {"text", "varchar", "bpchar", "name", "char", "citext"}
_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off"}
_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def quote_ident(name: str) -> str:
    """`public.Items` -> "public"."items"; `"My Table"` stays as written."""
    parts: list[str] = []
    for part in re.findall(r'"(?:[^"]|"")*"|[^.]+', str(name).strip()):
        if part.startswith('"') and part.endswith('"') and len(part) >= 2:
            parts.append(part)
        else:
            parts.append('"' + part.strip().lower().replace('"', '""') + '"')
    if not parts:
        raise ActionError(f"invalid SQL identifier {name!r}")
    return ".".join(parts)


def rows_of(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return data
    raise ActionError(f"save data must be a mapping of column -> value (or a list of them), "
                      f"got {type(data).__name__}")


def insert_sql(table: str, columns: list[str], mode: str, keys: list[str], placeholder: str) -> str:
    cols = ", ".join(quote_ident(c) for c in columns)
    values = ", ".join(placeholder.format(i + 1) for i in range(len(columns)))
    sql = f"INSERT INTO {quote_ident(table)} ({cols}) VALUES ({values})"
    if mode == "upsert":
        if not keys:
            raise ActionError("mode: upsert needs `key` (a column or a list of columns)")
        missing = [k for k in keys if k not in columns]
        if missing:
            raise ActionError(f"upsert key {missing} is not among the saved columns {columns}")
        others = [c for c in columns if c not in keys]
        conflict = ", ".join(quote_ident(k) for k in keys)
        if others:
            sets = ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in others)
            sql += f" ON CONFLICT ({conflict}) DO UPDATE SET {sets}"
        else:
            sql += f" ON CONFLICT ({conflict}) DO NOTHING"
    return sql


def _keys(spec: dict[str, Any]) -> list[str]:
    key = spec.get("key")
    if key is None:
        return []
    return [key] if isinstance(key, str) else [str(k) for k in key]


# --- postgres ------------------------------------------------------------------------------------
async def save_postgres(spec: dict[str, Any], data: Any, inv: Invocation) -> dict[str, Any]:
    try:
        resolved = await resolve_single(spec.get("auth") or inv.auth, inv.secrets, "postgres")
    except AuthError as exc:
        raise ActionError(f"postgres save: {exc}") from exc
    if resolved is None:
        raise ActionError("postgres save needs `auth` naming a postgres credential")
    params = pg_params(resolved)
    command, table = spec.get("command"), spec.get("table")
    async with connect(params, inv.timeout) as conn:
        if command:
            written = 0
            for i, statement in enumerate(split_sql(str(command))):
                try:
                    written += await _run_named(conn, statement, data)
                except asyncpg.PostgresError as exc:
                    raise ActionError(f"postgres save command_{i} failed: {describe(exc)}") from exc
                except (asyncpg.DataError, ValueError, TypeError, OverflowError) as exc:
                    raise ActionError(f"postgres save command_{i} failed: {exc}") from exc
            return {"storage": "postgres", "command": True, "rows": written}
        if not table:
            raise ActionError("postgres save needs `table` (or an explicit `command`)")
        rows = rows_of(data)
        columns = list(dict.fromkeys(c for r in rows for c in r))
        sql = insert_sql(str(table), columns, str(spec.get("mode") or "insert"), _keys(spec), "${}")
        try:
            prepared = await conn.prepare(sql)
            types = [t.name for t in prepared.get_parameters()]
            args = [[fit(r.get(c), t) for c, t in zip(columns, types)] for r in rows]
            await prepared.executemany(args)
        except asyncpg.PostgresError as exc:
            raise ActionError(f"save to postgres table {table} failed: {describe(exc)}") from exc
        except (asyncpg.DataError, ValueError, TypeError, OverflowError) as exc:
            raise ActionError(f"save to postgres table {table} failed: {exc}") from exc
    return {"storage": "postgres", "table": str(table), "rows": len(rows)}


async def _run_named(conn: asyncpg.Connection, statement: str, data: Any) -> int:
    """An explicit save statement: `:name` placeholders bind the rendered data's values by name."""
    names: list[str] = []
    values = data if isinstance(data, dict) else {}

    def number(m: re.Match) -> str:
        if m.group(1) not in values:
            return m.group(0)
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    sql = _outside_quotes(statement, lambda chunk: _NAMED.sub(number, chunk))
    prepared = await conn.prepare(sql)
    types = [t.name for t in prepared.get_parameters()]
    await prepared.fetch(*[fit(values[n], t) for n, t in zip(names, types)])
    tag = prepared.get_statusmsg() or ""
    last = tag.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def _outside_quotes(sql: str, fn: Any) -> str:
    """Apply fn to the parts of sql outside '...' and "..." (a ':30' inside a literal is not a name)."""
    parts = re.split(r"('(?:[^']|'')*'|\"(?:[^\"]|\"\")*\")", sql)
    return "".join(p if i % 2 else fn(p) for i, p in enumerate(parts))


def fit(value: Any, pg_type: str) -> Any:
    """value in the Python type asyncpg binds for pg_type; anything that does not fit is left for the
    database to reject with its own message."""
    if value is None:
        return None
    if pg_type.startswith("_") and isinstance(value, (list, tuple)):
        return [fit(v, pg_type[1:]) for v in value]
    if pg_type in ("json", "jsonb"):
        return value                                  # the connection's codec encodes it
    if pg_type in _TEXT:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (dict, list)):
            return json.dumps(value)
        return value if isinstance(value, str) else str(value)
    if pg_type in _INT:
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
            return int(value)
        return value
    if pg_type in _FLOAT:
        if isinstance(value, (int, decimal.Decimal)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        return value
    if pg_type == "numeric":
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return decimal.Decimal(str(value).strip())
            except decimal.InvalidOperation:
                return value
        return value
    if pg_type == "bool":
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        return value
    if pg_type in ("timestamp", "timestamptz") and isinstance(value, str):
        parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        if pg_type == "timestamptz" and parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.timezone.utc)   # a naive time in a save is UTC, like now()
        if pg_type == "timestamp" and parsed.tzinfo is not None:
            parsed = parsed.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return parsed
    if pg_type == "date" and isinstance(value, str):
        return dt.date.fromisoformat(value.strip()[:10])
    if pg_type in ("time", "timetz") and isinstance(value, str):
        return dt.time.fromisoformat(value.strip())
    if pg_type == "interval" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return dt.timedelta(seconds=value)
    if pg_type == "uuid" and not isinstance(value, str):
        return str(value)
    return value


# --- duckdb --------------------------------------------------------------------------------------
_DUCK_TYPES = ((bool, "BOOLEAN"), (int, "BIGINT"), (float, "DOUBLE"), (dict, "JSON"), (list, "JSON"))


async def save_duckdb(spec: dict[str, Any], data: Any, inv: Invocation) -> dict[str, Any]:
    settings = inv.ports.step_settings
    database = checked_database(str(spec.get("database") or ":memory:"), settings)
    command, table = spec.get("command"), spec.get("table")
    if command:
        statements = split_sql(str(command))
        return await asyncio.to_thread(_duck_commands, database, statements, settings)
    if not table:
        raise ActionError("duckdb save needs `table` (or an explicit `command`)")
    rows = rows_of(data)
    columns = list(dict.fromkeys(c for r in rows for c in r))
    mode, keys = str(spec.get("mode") or "insert"), _keys(spec)
    sql = insert_sql(str(table), columns, mode, keys, "${}")
    create = _create_sql(str(table), columns, rows, keys if mode == "upsert" else [])
    args = [[_duck_value(r.get(c)) for c in columns] for r in rows]
    return await asyncio.to_thread(_duck_insert, database, create, sql, args, str(table), settings)


def _create_sql(table: str, columns: list[str], rows: list[dict], keys: list[str]) -> str:
    """A table that does not exist yet is created from the first non-null value of each column."""
    defs = []
    for c in columns:
        sample = next((r[c] for r in rows if r.get(c) is not None), None)
        kind = next((t for py, t in _DUCK_TYPES if isinstance(sample, py)), "VARCHAR")
        defs.append(f"{quote_ident(c)} {kind}")
    if keys:
        defs.append(f"PRIMARY KEY ({', '.join(quote_ident(k) for k in keys)})")
    return f"CREATE TABLE IF NOT EXISTS {quote_ident(table)} ({', '.join(defs)})"


def _duck_value(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


@contextlib.contextmanager
def _confined(database: str, settings: StepSettings) -> Iterator[Any]:
    """A DuckDB connection under the same confinement as a duckdb step (actions/duckdb.py)."""
    spill = spill_folder(settings)
    try:
        with duckdb_connect(database) as con:
            confine(con, settings, spill)
            yield con
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def _duck_insert(database: str, create: str, sql: str, args: list[list[Any]], table: str,
                 settings: StepSettings) -> dict[str, Any]:
    import duckdb

    try:
        with _confined(database, settings) as con:
            con.execute(create)
            con.executemany(sql, args)
    except duckdb.Error as exc:
        raise ActionError(f"save to duckdb table {table} failed: {str(exc).strip()}") from exc
    return {"storage": "duckdb", "table": table, "rows": len(args), "database": database}


def _duck_commands(database: str, statements: list[str], settings: StepSettings) -> dict[str, Any]:
    import duckdb

    try:
        with _confined(database, settings) as con:
            for i, statement in enumerate(statements):
                try:
                    con.execute(statement)
                except duckdb.Error as exc:
                    raise ActionError(f"duckdb save command_{i} failed: {str(exc).strip()}") from exc
    except duckdb.Error as exc:
        raise ActionError(f"cannot open duckdb database {database!r}: {exc}") from exc
    return {"storage": "duckdb", "command": True, "database": database}
