"""Projects noetl.events (and noetl.catalog) into the Postgres read model, idempotently.

`Projector.apply(events)` handles one consumed batch in ONE transaction:

1. lock the batch's executions (transaction-scoped advisory locks, taken in key order so two projectors
   never deadlock), so two projectors of one execution (a rebalance overlap) serialise;
2. `INSERT ... ON CONFLICT (event_id) DO NOTHING RETURNING event_id`: the new events, duplicates dropped;
3. for every execution that got a new event, recompute its row with `noetl_common.projection.summary` over
   its whole log (in seq order) and upsert it;
4. NOTIFY `events_channel(schema)` with each such execution id (delivered on commit): the console's live
   pages in every API process hear it (noetl_runtime.change_feed).

The row of an execution is therefore always `summary(its events in the table)`: a function of the SET of
its events. A duplicate inserts nothing and recomputes nothing, so applying a batch twice, or replaying
the topic from offset 0 after a restart, leaves the tables byte-for-byte as they were. The caller commits
its Kafka offsets only after `apply` returned (the transaction committed): architecture §2.6.

The whole log of an execution is needed for the summary (progress folds every step), and re-reading it from
the table on every batch makes long executions quadratic. The projector therefore keeps the logs of
running executions in memory, and trusts such a cached log only when it matches the row's `event_count` and
`last_seq` read under the lock; otherwise it reads the log from the table. Either way the summary is
computed over the complete log, never patched incrementally.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Iterable, Sequence

import pydantic_core

from noetl_common import projection
from noetl_common.messages import Event
from noetl_common.ports import CatalogEntry
from noetl_runtime.change_feed import events_channel
from noetl_runtime.postgres_schema import DEFAULT_SCHEMA, connection, qualify

DEFAULT_CACHE_EVENTS = 100_000
_TERMINAL = frozenset(projection.TERMINAL_STATUS.values())
# An escaped NUL (\u0000) is valid JSON but jsonb refuses it; one preceded by an odd number of backslashes
# is literal text, not an escape, and must stay.
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def to_jsonb_text(value: Any) -> str:
    """JSON text that jsonb accepts: NaN/inf as null (as on the wire), escaped NULs as U+FFFD."""
    return jsonb_safe(pydantic_core.to_json(value, inf_nan_mode="null").decode())


def jsonb_safe(text: str) -> str:
    return _JSON_NUL.sub(r"\1\\ufffd", text) if "\\u0000" in text else text


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class Projector:
    """Writes the read model; `pool` is an asyncpg Pool (or one Connection, used for every batch)."""

    def __init__(self, pool: Any, schema: str = DEFAULT_SCHEMA, *, cache_events: int = DEFAULT_CACHE_EVENTS) -> None:
        self.pool = pool
        self.schema = schema
        self.cache_events = cache_events
        self._cache: OrderedDict[str, list[Event]] = OrderedDict()   # running executions' logs, LRU
        self._cached = 0
        # Counters for metrics and tests: events inserted, and execution logs read back from the table.
        self.stats = {"events": 0, "log_reads": 0}
        q = qualify(schema)
        self._sql_lock = (
            "SELECT pg_advisory_xact_lock(k) FROM (SELECT DISTINCT hashtextextended($2 || x, 0) AS k"
            " FROM unnest($1::text[]) AS x ORDER BY k) AS keys")
        self._sql_rows = f"SELECT execution_id, event_count, last_seq FROM {q}.execution WHERE execution_id = ANY($1::text[])"
        # Rows travel as ONE json array parameter, unpacked by Postgres: far cheaper than 15 typed arrays
        # (asyncpg encodes those element by element), and timestamps are parsed by one parser, Postgres'.
        self._sql_insert = f"""
            INSERT INTO {q}.event (event_id, execution_id, parent_execution_id, seq, event_type, node_name,
                                   node_type, status, "timestamp", attempt, current_index, duration, command_id,
                                   error, body)
            SELECT b->>'event_id', b->>'execution_id', b->>'parent_execution_id', (b->>'seq')::int,
                   b->>'event_type', b->>'node_name', b->>'node_type', b->>'status',
                   (b->>'timestamp')::timestamptz, (b->>'attempt')::int, (b->>'current_index')::int,
                   (b->>'duration')::float8, b->>'command_id', b->>'error', b
            FROM jsonb_array_elements($1::jsonb) AS b
            ON CONFLICT (event_id) DO NOTHING
            RETURNING event_id"""
        self._sql_logs = (f"SELECT body::text FROM {q}.event WHERE execution_id = ANY($1::text[])"
                          " ORDER BY execution_id, seq, event_id COLLATE \"C\"")
        self._sql_upsert = f"""
            INSERT INTO {q}.execution (execution_id, parent_execution_id, path, version, playbook_name, status,
                                       start_time, end_time, duration, progress, result, error, last_event_time,
                                       last_seq, event_count, quarantined)
            SELECT r->>'execution_id', r->>'parent_execution_id', r->>'path', (r->>'version')::int,
                   r->>'playbook_name', r->>'status', (r->>'start_time')::timestamptz,
                   (r->>'end_time')::timestamptz, (r->>'duration')::float8, (r->>'progress')::int,
                   NULLIF(r->'result', 'null'::jsonb), r->>'error', (r->>'last_event_time')::timestamptz,
                   (r->>'last_seq')::int, (r->>'event_count')::int, COALESCE((r->>'quarantined')::boolean, false)
            FROM jsonb_array_elements($1::jsonb) AS r
            ON CONFLICT (execution_id) DO UPDATE SET
                parent_execution_id = excluded.parent_execution_id, path = excluded.path,
                version = excluded.version, playbook_name = excluded.playbook_name, status = excluded.status,
                start_time = excluded.start_time, end_time = excluded.end_time, duration = excluded.duration,
                progress = excluded.progress, result = excluded.result, error = excluded.error,
                last_event_time = excluded.last_event_time, last_seq = excluded.last_seq,
                event_count = excluded.event_count, quarantined = excluded.quarantined, updated_at = now()"""
        self._sql_catalog = f"""
            INSERT INTO {q}.catalog (path, version, content, document, created_at, registered_by)
            SELECT p, v, c, d::jsonb, to_timestamp(t), r
            FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::float8[], $6::text[])
                AS u(p, v, c, d, t, r)
            ON CONFLICT (path, version) DO UPDATE SET content = excluded.content, document = excluded.document,
                created_at = excluded.created_at, registered_by = excluded.registered_by
            WHERE (catalog.content, catalog.document, catalog.created_at, catalog.registered_by)
                  IS DISTINCT FROM (excluded.content, excluded.document, excluded.created_at, excluded.registered_by)
            RETURNING path"""

    # ------------------------------------------------------------------------------------------- events
    async def apply(self, events: Iterable[Event]) -> int:
        """Project one batch in one transaction; returns how many events were new."""
        batch: dict[str, Event] = {}
        for event in events:
            batch.setdefault(event.event_id, event)      # a duplicate within the batch: the first wins
        if not batch:
            return 0
        execution_ids = sorted({e.execution_id for e in batch.values()})
        async with connection(self.pool) as conn, conn.transaction():
            await conn.execute("SET LOCAL TimeZone = 'UTC'")   # a timestamp without offset means UTC
            await conn.execute(self._sql_lock, execution_ids, self.schema + ":")
            rows = {r["execution_id"]: (r["event_count"], r["last_seq"])
                    for r in await conn.fetch(self._sql_rows, execution_ids)}
            body = jsonb_safe("[" + ",".join(e.model_dump_json() for e in batch.values()) + "]")
            inserted = {r["event_id"] for r in await conn.fetch(self._sql_insert, body)}
            if not inserted:
                return 0
            new: dict[str, list[Event]] = {}
            for event in batch.values():
                if event.event_id in inserted:
                    new.setdefault(event.execution_id, []).append(event)
            logs = await self._logs(conn, new, rows)
            summaries = {eid: projection.summary(log) for eid, log in logs.items()}
            await conn.execute(self._sql_upsert, self._execution_rows(summaries, logs))
            await conn.execute("SELECT pg_notify($1, x) FROM unnest($2::text[]) AS x", events_channel(self.schema),
                               sorted(new))
        self._remember(logs, summaries)                  # only once the transaction committed
        self.stats["events"] += len(inserted)
        return len(inserted)

    async def _logs(self, conn: Any, new: dict[str, list[Event]],
                    rows: dict[str, tuple[int, int]]) -> dict[str, list[Event]]:
        """Every affected execution's complete log (the committed events + this batch's new ones), by seq."""
        logs: dict[str, list[Event]] = {}
        fetch: list[str] = []
        for eid, added in new.items():
            known = rows.get(eid)
            cached = self._cache.get(eid)
            if known is None:                            # no row: nothing of it was committed before
                logs[eid] = sorted(added, key=_order)
            elif cached and (len(cached), cached[-1].seq) == known:
                logs[eid] = sorted([*cached, *added], key=_order)
            else:
                fetch.append(eid)
        if fetch:
            self.stats["log_reads"] += len(fetch)
            for (body,) in await conn.fetch(self._sql_logs, fetch):   # already includes this batch's inserts
                event = Event.model_validate_json(body)
                logs.setdefault(event.execution_id, []).append(event)
        return logs

    def _remember(self, logs: dict[str, list[Event]], summaries: dict[str, dict[str, Any]]) -> None:
        if self.cache_events <= 0:
            return
        for eid, log in logs.items():
            old = self._cache.pop(eid, None)
            self._cached -= len(old) if old is not None else 0
            if summaries[eid]["status"] in _TERMINAL:    # nothing but duplicates follows a terminal event
                continue
            self._cache[eid] = [_lean(e) for e in log]
            self._cached += len(log)
        while self._cached > self.cache_events and self._cache:
            _, evicted = self._cache.popitem(last=False)
            self._cached -= len(evicted)

    def clear_cache(self) -> None:
        """Forget cached logs (e.g. after the tables were truncated behind the projector's back)."""
        self._cache.clear()
        self._cached = 0

    async def rebuild(self, execution_ids: Sequence[str] | None = None) -> int:
        """Recompute execution rows from the event table (all, or the given ones): after a change of the
        projection rules, no replay of the topic is needed. Returns the number of rows written."""
        q = qualify(self.schema)
        async with connection(self.pool) as conn:
            if execution_ids is None:
                execution_ids = [r[0] for r in await conn.fetch(f"SELECT DISTINCT execution_id FROM {q}.event")]
            written = 0
            for start in range(0, len(execution_ids), 200):
                chunk = sorted(execution_ids[start:start + 200])
                async with conn.transaction():
                    await conn.execute("SET LOCAL TimeZone = 'UTC'")
                    await conn.execute(self._sql_lock, chunk, self.schema + ":")
                    logs: dict[str, list[Event]] = {}
                    for (body,) in await conn.fetch(self._sql_logs, chunk):
                        event = Event.model_validate_json(body)
                        logs.setdefault(event.execution_id, []).append(event)
                    summaries = {eid: projection.summary(log) for eid, log in logs.items()}
                    if summaries:
                        await conn.execute(self._sql_upsert, self._execution_rows(summaries, logs))
                    written += len(summaries)
        self.clear_cache()
        return written

    @staticmethod
    def _execution_rows(summaries: dict[str, dict[str, Any]], logs: dict[str, list[Event]]) -> str:
        rows = [{**summaries[eid], "version": _int_or_none(summaries[eid]["version"]),
                 "last_seq": logs[eid][-1].seq, "event_count": len(logs[eid])} for eid in sorted(summaries)]
        return to_jsonb_text(rows)

    # ------------------------------------------------------------------------------------------ catalog
    async def apply_catalog(self, entries: Iterable[CatalogEntry]) -> int:
        """Upsert registrations by (path, version); returns how many rows were inserted or changed.
        Re-applying the same entries changes nothing (not even a dead tuple)."""
        latest: dict[tuple[str, int], CatalogEntry] = {}
        for entry in entries:
            latest[(entry.path, entry.version)] = entry  # the last message for a key wins (compacted topic)
        if not latest:
            return 0
        columns: list[list[Any]] = [[], [], [], [], [], []]
        for (path, version), entry in sorted(latest.items()):
            for column, value in zip(columns, (path, version, entry.content, to_jsonb_text(entry.document),
                                               entry.created_at, entry.registered_by)):
                column.append(value)
        async with connection(self.pool) as conn, conn.transaction():
            return len(await conn.fetch(self._sql_catalog, *columns))


def _order(event: Event) -> tuple[int, str]:
    return event.seq, event.event_id


def _lean(event: Event) -> Event:
    """The event as the cache keeps it: without the captured step output (meta.log, up to
    NOETL_STEP_LOG_MAX_BYTES each), which no summary reads; the table keeps the whole event."""
    if not event.meta or "log" not in event.meta:
        return event
    return event.model_copy(update={"meta": {k: v for k, v in event.meta.items() if k != "log"}})
