"""The read side of the query service on Postgres: what the read API serves, from the projected tables.

Execution headers come from the `execution` table, which the projector keeps equal to
`noetl_common.projection.summary` over the execution's events; step reports are `projection.steps` over
the events themselves. Nothing here derives a status of its own.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from noetl_common import projection
from noetl_common.messages import Event
from noetl_common.ports import CatalogEntry
from noetl_query.handlers import ExecutionFilters, LogFilters, LogPage, Page
from noetl_runtime.postgres_schema import DEFAULT_SCHEMA, connection, qualify
from noetl_runtime.postgres_store import read_events

_SUMMARY_COLUMNS = ("execution_id, parent_execution_id, path, version, playbook_name, status, start_time,"
                    " end_time, duration, progress, result::text AS result, error, last_event_time, quarantined")

TimeBound = datetime | str | float | int | None

# The events the logs API lists (noetl_common.attempt_logs.is_attempt_log, in SQL), word for word the
# predicate of the partial index of migration 0006, so the planner uses that index.
LOG_EVENTS_SQL = ("(event_type = 'action_error'"
                  " OR (event_type IN ('action_completed', 'iteration_completed')"
                  " AND COALESCE(body #>> '{meta,log}', '') <> ''))")


def iso(value: datetime | None) -> str | None:
    """A timestamptz as the engine writes event timestamps (ISO-8601 UTC, milliseconds, `Z`)."""
    if value is None:
        return None
    value = value.astimezone(timezone.utc)
    spec = "milliseconds" if value.microsecond % 1000 == 0 else "microseconds"
    return value.isoformat(timespec=spec).replace("+00:00", "Z")


def to_datetime(value: TimeBound) -> datetime | None:
    """A time bound given as a datetime, an ISO-8601 string or epoch seconds (naive means UTC)."""
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=timezone.utc)
    try:
        return datetime.fromtimestamp(float(value), tz=timezone.utc)
    except ValueError:
        parsed = datetime.fromisoformat(value)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _summary(row: Any) -> dict[str, Any]:
    """A row of `execution` as the dict `projection.summary` returns."""
    return {
        "execution_id": row["execution_id"], "parent_execution_id": row["parent_execution_id"],
        "path": row["path"], "version": row["version"], "playbook_name": row["playbook_name"],
        "status": row["status"], "start_time": iso(row["start_time"]), "end_time": iso(row["end_time"]),
        "duration": row["duration"], "progress": row["progress"],
        "result": None if row["result"] is None else json.loads(row["result"]),
        "error": row["error"], "last_event_time": iso(row["last_event_time"]), "quarantined": row["quarantined"],
    }


def _entry(row: Any) -> CatalogEntry:
    return CatalogEntry(path=row["path"], version=row["version"], content=row["content"],
                        document=json.loads(row["document"]), created_at=row["created_at"],
                        registered_by=row.get("registered_by"))


class PostgresReadModel:
    """`noetl_query.handlers.ReadModel` on the projected tables; `pool` is an asyncpg Pool (or a Connection)."""

    def __init__(self, pool: Any, schema: str = DEFAULT_SCHEMA) -> None:
        self.pool = pool
        self.schema = schema
        self._q = qualify(schema)

    async def executions(self, filters: ExecutionFilters | None = None,
                         page: Page | None = None) -> tuple[list[dict[str, Any]], int]:
        """(the page's summaries, newest start first; how many executions match in all). Filters: status,
        exact path, parent execution, since <= start_time <= until (both inclusive, naive = UTC)."""
        filters = filters or ExecutionFilters()
        page = page or Page()
        where: list[str] = []
        args: list[Any] = []
        for column, op, value in (("status", "=", filters.status), ("path", "=", filters.path),
                                  ("parent_execution_id", "=", filters.parent_execution_id),
                                  ("start_time", ">=", to_datetime(filters.since)),
                                  ("start_time", "<=", to_datetime(filters.until))):
            if value is not None:
                args.append(value)
                where.append(f"{column} {op} ${len(args)}")
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        # One snapshot for the count and the page, so `total` describes the rows returned.
        async with connection(self.pool) as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            total = await conn.fetchval(f"SELECT count(*) FROM {self._q}.execution{clause}", *args)
            rows = await conn.fetch(
                f"SELECT {_SUMMARY_COLUMNS} FROM {self._q}.execution{clause}"
                f" ORDER BY start_time DESC NULLS LAST, execution_id DESC"
                f" LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}", *args, page.limit, page.offset)
        return [_summary(r) for r in rows], total

    async def execution(self, execution_id: str) -> dict[str, Any] | None:
        """projection.summary of the execution (its projected row: one indexed read), or None."""
        async with connection(self.pool) as conn:
            row = await conn.fetchrow(f"SELECT {_SUMMARY_COLUMNS} FROM {self._q}.execution WHERE execution_id = $1",
                                      execution_id)
        return _summary(row) if row else None

    async def execution_detail(self, execution_id: str) -> dict[str, Any] | None:
        """`{**summary, "steps": projection.steps(events), "events": [Event...]}`, or None if unknown.
        Header and events are read in one snapshot, so they always agree."""
        async with connection(self.pool) as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            row = await conn.fetchrow(f"SELECT {_SUMMARY_COLUMNS} FROM {self._q}.execution WHERE execution_id = $1",
                                      execution_id)
            if row is None:
                return None
            events = await self._events(conn, execution_id)
        return {**_summary(row), "steps": projection.steps(events), "events": events}

    async def events(self, execution_id: str, after_seq: int = -1, limit: int | None = None) -> list[Event]:
        """The execution's events in seq order (those with seq > after_seq, at most `limit`); [] if unknown."""
        async with connection(self.pool) as conn:
            return await self._events(conn, execution_id, after_seq, limit)

    async def attempt_logs(self, execution_id: str, filters: LogFilters,
                           page: LogPage) -> tuple[list[Event], int] | None:
        """The events that carry attempts' output (migration 0006's index), by timestamp then seq, and how
        many match; None when the execution is unknown."""
        where, args = ["execution_id = $1", LOG_EVENTS_SQL], [execution_id]
        for column, value in (("node_name", filters.step), ("attempt", filters.attempt),
                              ("current_index", filters.index)):
            if value is not None:
                args.append(value)
                where.append(f"{column} = ${len(args)}")
        clause = " AND ".join(where)
        async with connection(self.pool) as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            if await conn.fetchval(f"SELECT 1 FROM {self._q}.execution WHERE execution_id = $1", execution_id) is None:
                return None
            total = await conn.fetchval(f"SELECT count(*) FROM {self._q}.event WHERE {clause}", *args)
            # The page's ids from the index first: the rows an OFFSET skips never have their body read.
            rows = await conn.fetch(
                f"SELECT e.body::text FROM (SELECT event_id, \"timestamp\", seq FROM {self._q}.event WHERE {clause}"
                f' ORDER BY "timestamp", seq LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}) AS page'
                f' JOIN {self._q}.event AS e USING (event_id) ORDER BY page."timestamp", page.seq',
                *args, page.limit, page.offset)
        return [Event.model_validate_json(body) for (body,) in rows], total

    async def event(self, event_id: str) -> Event | None:
        """One event by its id (the API's `/execution/data/{id}` accepts an event id too)."""
        async with connection(self.pool) as conn:
            body = await conn.fetchval(f"SELECT body::text FROM {self._q}.event WHERE event_id = $1", event_id)
        return Event.model_validate_json(body) if body is not None else None

    async def _events(self, conn: Any, execution_id: str, after_seq: int = -1,
                      limit: int | None = None) -> list[Event]:
        return await read_events(conn, self.schema, execution_id, after_seq, limit)

    async def catalog(self) -> list[CatalogEntry]:
        """Every registered version, by path then version (as the embedded catalog lists them)."""
        async with connection(self.pool) as conn:
            rows = await conn.fetch(f"SELECT path, version, content, document::text AS document,"
                                    f" extract(epoch FROM created_at)::float8 AS created_at, registered_by"
                                    f" FROM {self._q}.catalog ORDER BY path, version")
        return [_entry(r) for r in rows]

    catalog_list = catalog

    async def playbook(self, path: str, version: int | str | None = None) -> CatalogEntry | None:
        """One registration: the given version, or the latest for None / "latest"."""
        sql = (f"SELECT path, version, content, document::text AS document,"
               f" extract(epoch FROM created_at)::float8 AS created_at, registered_by"
               f" FROM {self._q}.catalog WHERE path = $1")
        async with connection(self.pool) as conn:
            if version is None or (isinstance(version, str) and version.strip().lower() in ("", "latest")):
                row = await conn.fetchrow(sql + " ORDER BY version DESC LIMIT 1", path)
            else:
                try:
                    number = int(version)
                except (TypeError, ValueError):
                    return None
                row = await conn.fetchrow(sql + " AND version = $2", path, number)
        return _entry(row) if row else None
