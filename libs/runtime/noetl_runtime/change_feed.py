"""Which executions just changed, pushed to whoever watches (the console's server-sent events).

    ChangeFeed            in-process: `publish(execution_id)` from whoever writes events; `subscribe()` gives
                          a queue of changed execution ids. Embedded mode publishes from the runtime's event
                          listener, after the SQLite commit (so a page rendered on the signal shows the event).
    PostgresChangeFeed    the same over Postgres LISTEN/NOTIFY: the query projector notifies
                          `events_channel(schema)` with the execution id inside the transaction that projects
                          the events (Postgres delivers it on commit), so every API process of a cluster
                          (and `noetl server --kafka`) hears every projected event, whichever process
                          projected it. It listens on one pooled connection while anyone is subscribed.

A signal carries only the execution id: a watcher re-reads the read model, so a lost or merged signal
loses nothing but latency. A slow watcher's queue is bounded; when full, the oldest ids are dropped and
`OVERFLOW` is queued instead ("something changed: refresh everything").
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

log = logging.getLogger("noetl.feed")

OVERFLOW = "*"          # queued instead of ids a watcher was too slow to take
QUEUE_SIZE = 1000       # ids a watcher may lag behind by


def events_channel(schema: str) -> str:
    """The NOTIFY channel of a schema's projected events (one database may hold several installations)."""
    return f"noetl_events.{schema}"[:63]   # a channel name is an identifier: at most 63 bytes


class ChangeFeed:
    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[str]] = set()

    @property
    def watchers(self) -> int:
        return len(self._queues)

    def publish(self, execution_id: str) -> None:
        for queue in list(self._queues):
            try:
                queue.put_nowait(execution_id)
            except asyncio.QueueFull:
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(OVERFLOW)

    async def _first_watcher(self) -> None:
        """Hook for feeds that need a source while anyone watches."""

    async def _last_watcher_left(self) -> None:
        """Hook: the source may stop."""

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[str]]:
        queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_SIZE)
        if not self._queues:
            await self._first_watcher()
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)
            if not self._queues:
                await self._last_watcher_left()


class PostgresChangeFeed(ChangeFeed):
    """LISTEN on `events_channel(schema)` through one connection of `pool`, held while anyone watches."""

    def __init__(self, pool: Any, schema: str) -> None:
        super().__init__()
        self.pool, self.channel = pool, events_channel(schema)
        self._conn: Any = None
        self._lock = asyncio.Lock()

    def _heard(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.publish(payload)

    async def _first_watcher(self) -> None:
        async with self._lock:
            if self._conn is None:
                conn = await self.pool.acquire()
                try:
                    await conn.add_listener(self.channel, self._heard)
                except BaseException:
                    await self.pool.release(conn)
                    raise
                self._conn = conn

    async def _last_watcher_left(self) -> None:
        # Shielded: the last watcher usually leaves because its stream was cancelled (the browser went away),
        # and a release interrupted by that cancellation would leak the pooled connection for good.
        await asyncio.shield(self._release())

    async def _release(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is None or self._queues:   # (someone subscribed again meanwhile: keep listening)
                self._conn = conn
                return
            with contextlib.suppress(Exception):   # a closed pool or a broken connection: nothing to keep
                await conn.remove_listener(self.channel, self._heard)
            with contextlib.suppress(Exception):
                await self.pool.release(conn)
