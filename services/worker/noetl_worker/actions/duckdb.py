"""`type: duckdb` (DSL §2.3): the step's SQL run in-process, in a thread (DuckDB calls block).

`database` names a file (shared by steps that name the same one) or, by default, `:memory:` (private to
the attempt). An `auth` alias map becomes one DuckDB SECRET per alias, best effort: a secret type DuckDB
cannot create here (e.g. its extension is not installed and cannot be downloaded) is noted in the step log
and the statements run anyway, so the statement that needs it reports the real error.
A timeout or cancellation interrupts the running query (`interrupt()`), so the thread does not run on.

Confinement (docs/security.md): the step's SQL runs in the engine's process, so DuckDB's own guard is
what keeps it from the engine's files. Every connection (steps and duckdb saves) is `confined` before
the step's SQL runs: external access off, except for NOETL_STEP_DUCKDB_DIRECTORIES (directories and URL
prefixes) and a private spill folder; the configuration locked, so SQL cannot turn it back on;
persistent secrets off (no reading the engine user's ~/.duckdb). A `database` file must lie in a declared
directory. `INSTALL x` / `LOAD x` run before the lock when `x` is in NOETL_STEP_DUCKDB_EXTENSIONS and are
refused otherwise.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from typing import Any

from noetl_runtime.settings import StepSettings

from noetl_worker.actions.base import ActionError, ActionOutput, Invocation, json_cell, sql_text
from noetl_worker.auth import AuthError, ResolvedAuth, first, resolve_auth
from noetl_worker.sql import split_sql

_EXTENSION = re.compile(r"""\A\s*(?:FORCE\s+)?(INSTALL|LOAD)\s+['"]?(\w+)['"]?\s*;?\s*\Z""", re.IGNORECASE)
_DONE = {"status": "success", "rows": [], "row_count": 0, "columns": []}


async def run(inv: Invocation) -> ActionOutput:
    statements = split_sql(sql_text(inv.config, inv.data))
    if not statements:
        raise ActionError("the SQL has no statements (only comments or whitespace)")
    settings = inv.ports.step_settings
    database = checked_database(str(inv.config.get("database") or inv.data.get("database") or ":memory:"),
                                settings)
    extensions = extension_statements(statements, settings)
    secrets_sql = await secret_statements(inv)
    result = await run_in_thread(database, secrets_sql + extensions, statements, inv)
    return ActionOutput(result)


def checked_database(database: str, settings: StepSettings) -> str:
    """':memory:', or the real path of a database file inside a declared directory."""
    if database in ("", ":memory:") or database.startswith(":memory:"):
        return database or ":memory:"
    if ":" in database.split("/", 1)[0]:   # md:, motherduck:, s3:// ...: not a local file
        raise ActionError(f"duckdb database {database!r} is not a local file; DuckDB steps open files only")
    path = os.path.realpath(os.path.expanduser(database))
    allowed = local_directories(settings)
    if not any(path.startswith(d) for d in allowed):
        where = ", ".join(allowed) or "none are declared"
        raise ActionError(f"duckdb database {database!r} is outside the directories DuckDB steps may use "
                          f"(NOETL_STEP_DUCKDB_DIRECTORIES: {where})")
    return path


def local_directories(settings: StepSettings) -> list[str]:
    return [os.path.join(os.path.realpath(os.path.expanduser(d)), "")
            for d in settings.duckdb_directory_list if "://" not in d]


def extension_statements(statements: list[str], settings: StepSettings) -> list[tuple[str, str]]:
    """The step's INSTALL/LOAD statements, run before the configuration is locked (as (index, sql)
    setup entries); refused for extensions the operator did not allow."""
    found: list[tuple[str, str]] = []
    for i, statement in enumerate(statements):
        match = _EXTENSION.match(statement)
        if match is None:
            continue
        name = match.group(2).lower()
        if name not in settings.duckdb_extension_names:
            allowed = ", ".join(settings.duckdb_extension_names) or "none are"
            raise ActionError(f"command_{i}: DuckDB extension {name!r} may not be installed or loaded by steps "
                              f"(NOETL_STEP_DUCKDB_EXTENSIONS: {allowed} allowed)")
        found.append((f"#{i}", f"{match.group(1).upper()} {name}"))
    return found


def connect(database: str) -> Any:
    import duckdb  # heavy (~0.1 s): only workers that run DuckDB steps pay for it

    return duckdb.connect(database, config={"allow_persistent_secrets": False,
                                            "autoinstall_known_extensions": False})


def confine(con: Any, settings: StepSettings, spill: str) -> None:
    """External access limited to the declared directories and `spill`, then the configuration locked."""
    allowed = local_directories(settings) + [d for d in settings.duckdb_directory_list if "://" in d]
    con.execute(f"SET allowed_directories = [{', '.join(_literal(d) for d in allowed)}]")
    con.execute(f"SET temp_directory = {_literal(spill)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def spill_folder(settings: StepSettings) -> str:
    return tempfile.mkdtemp(prefix="noetl-duckdb-", dir=settings.work_dir)


async def run_in_thread(database: str, setup: list[tuple[str, str]], statements: list[str],
                        inv: Invocation) -> dict[str, Any]:
    """Run `setup` (as (alias, sql): secrets best effort; `#i` entries are the step's own statement i)
    then confine the connection and run `statements`, in a worker thread, interruptibly."""
    holder: dict[str, Any] = {"settings": inv.ports.step_settings}
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
    import duckdb

    result: dict[str, Any] = {}
    try:
        con = connect(database)
    except duckdb.Error as exc:
        return ActionError(f"cannot open duckdb database {database!r}: {exc}")
    holder["con"] = con
    notes: list[str] = holder.setdefault("notes", [])
    spill = spill_folder(holder["settings"])
    done: set[int] = set()
    try:
        for alias, sql in setup:
            try:
                con.execute(sql)
            except duckdb.Error as exc:
                if alias.startswith("#"):   # the step's own INSTALL/LOAD: its failure is the step's
                    return ActionError(f"command_{alias[1:]}: {str(exc).strip()}", result=result)
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                notes.append(f"duckdb secret {alias!r} not created: {first_line}")
            else:
                if alias.startswith("#"):
                    done.add(int(alias[1:]))
        confine(con, holder["settings"], spill)
        for i, statement in enumerate(statements):
            if holder.get("cancelled"):
                return ActionError("cancelled")
            if i in done:
                result[f"command_{i}"] = dict(_DONE)
                continue
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
        shutil.rmtree(spill, ignore_errors=True)


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
