"""The query service's `ReadModel` over the embedded SQLite store.

The `executions` table (maintained by the store in the same transaction as the events, with DSL §7's
rules) serves only to filter and page; every summary shown is `projection.summary` of the events.
"""
from __future__ import annotations

from typing import Any

from noetl_common import projection
from noetl_common.messages import Event
from noetl_common.ports import CatalogEntry
from noetl_query.handlers import ExecutionFilters, LogFilters, LogPage, Page
from noetl_runtime.sqlite_store import LOG_EVENTS_SQL, SqliteStore


class SqliteReadModel:
    def __init__(self, store: SqliteStore) -> None:
        self._store = store

    async def executions(self, filters: ExecutionFilters, page: Page) -> tuple[list[dict[str, Any]], int]:
        where: list[str] = []
        args: list[Any] = []
        for clause, value in (("status = ?", filters.status), ("path = ?", filters.path),
                              ("start_time >= ?", filters.since_iso()), ("start_time <= ?", filters.until_iso()),
                              ("parent_execution_id = ?", filters.parent_execution_id)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql_where = f" WHERE {' AND '.join(where)}" if where else ""
        # SqliteStore has no filtered listing; its (internal) query helper shares its connection and lock.
        ((total,),) = self._store._query(f"SELECT COUNT(*) FROM executions{sql_where}", args)
        rows = self._store._query(
            f"SELECT execution_id FROM executions{sql_where}"
            " ORDER BY start_time IS NULL, start_time DESC, rowid DESC LIMIT ? OFFSET ?",
            [*args, page.limit, page.offset])
        summaries = []
        for (execution_id,) in rows:
            events = await self._store.events(execution_id)
            if events:
                summaries.append(projection.summary(events))
        return summaries, total

    async def execution(self, execution_id: str) -> dict[str, Any] | None:
        events = await self._store.events(execution_id)
        return projection.summary(events) if events else None

    async def events(self, execution_id: str, after_seq: int = -1) -> list[Event]:
        return await self._store.events(execution_id, after_seq)

    async def attempt_logs(self, execution_id: str, filters: LogFilters,
                           page: LogPage) -> tuple[list[Event], int] | None:
        if not self._store._query("SELECT 1 FROM executions WHERE execution_id = ?", (execution_id,)):
            return None
        where, args = ["execution_id = ?", LOG_EVENTS_SQL], [execution_id]
        for clause, value in (("node_name = ?", filters.step), ("json_extract(body, '$.attempt') = ?", filters.attempt),
                              ("json_extract(body, '$.current_index') = ?", filters.index)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql_where = " AND ".join(where)
        with self._store._lock:   # the count and the page from one state of the store
            ((total,),) = self._store._query(f"SELECT COUNT(*) FROM events WHERE {sql_where}", args)
            rows = self._store._query(f"SELECT body FROM events WHERE {sql_where} ORDER BY timestamp, seq"
                                      " LIMIT ? OFFSET ?", [*args, page.limit, page.offset])
        return [Event.model_validate_json(body) for (body,) in rows], total

    async def catalog(self) -> list[CatalogEntry]:
        return await self._store.catalog.list()

    async def playbook(self, path: str, version: int | None = None) -> CatalogEntry | None:
        return await self._store.catalog.get(path, version)
