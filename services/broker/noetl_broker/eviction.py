"""Finished executions leave the table NOETL_BROKER_EVICT_AFTER seconds after they ended.

Without this the table (memory, and the changelog replayed at every recovery) grows with every execution
ever run. A finished state is kept for a grace period because it is what makes a late duplicate harmless:
the fold drops a `start` for an existing execution, and every other message for a finished one, as stale.

After eviction the execution is unknown, and the fold treats messages for an unknown execution so:

- a fact (action_started/completed/failed, heartbeat, child_started/finished, timer_fired) or a cancel:
  stale, as for a finished execution (advance(None, msg) changes nothing and produces nothing);
- a `start`: it would run again. So `apply_batch` refuses (dead-letters, reason "late duplicate start")
  a `start` of an unknown execution whose Kafka record was produced more than half NOETL_BROKER_EVICT_AFTER
  after the request's own `time`: only a re-send of an old request looks like that, since a re-send
  repeats the original bytes (same `time`) in a new record. A new request that merely waited in the topic
  (a broker outage, a backlog) has a record timestamp close to its `time` and is started normally.
  A re-send within half the grace finds the state still there and is stale; half, so that a re-send
  produced just before the eviction but folded just after it (lag) is still refused. A re-send restarts
  an execution only if it waits in the topic longer than half the grace. (Requesters must stamp `time`
  with the real time, as docs/broker.md says.)

The schedule is in memory, for the owned partitions, rebuilt from the table after every recovery (the
`finished` time is in the snapshot); the folder evicts between batches, as the table's only writer, and the
committer writes the tombstones to the changelog in order with the snapshots (Broker.evict).
"""
from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from noetl_common.state_access import StateCache

from noetl_broker.timers import schedule_of


class Evictions:
    def __init__(self, after: float) -> None:
        self.after = after
        self._heap: list[tuple[float, str]] = []   # (evict at, execution id)

    @property
    def enabled(self) -> bool:
        return self.after > 0

    def finished(self, execution_id: str, at: float) -> None:
        """The execution ended at `at` (epoch seconds): evict it `after` seconds later."""
        if self.enabled:
            heapq.heappush(self._heap, (at + self.after, execution_id))

    def rebuild(self, finished: Iterable[tuple[str, float]]) -> None:
        """Replace the schedule (the finished executions of the table after a recovery)."""
        self._heap = [(at + self.after, eid) for eid, at in finished] if self.enabled else []
        heapq.heapify(self._heap)

    def revoke(self) -> None:
        self._heap.clear()

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def take(self, store: MutableMapping[bytes, bytes], cache: StateCache, now: float, limit: int
             ) -> dict[str, bytes | None]:
        """Remove from `store` (and `cache`) the finished states whose grace is over, at most `limit`; return
        them as tombstones (execution id -> None) for the changelog."""
        gone: dict[str, bytes | None] = {}
        while self._heap and self._heap[0][0] <= now and len(gone) < limit:
            execution_id = heapq.heappop(self._heap)[1]
            key = execution_id.encode()
            raw = store.get(key)
            if raw is None or schedule_of(raw)[1] is None:   # gone already (scheduled twice), or not finished
                continue
            del store[key]
            cache.take(execution_id, None)
            gone[execution_id] = None
        return gone

    async def ticker(self, ready: Callable[[], bool], put: Callable[[Any], Awaitable[None]], item: Any,
                     interval: float = 1.0) -> None:
        """Put `item` in the folder's inbox whenever an eviction is due (checked every `interval` s): the
        folder evicts between batches, as the table's only writer."""
        while True:
            await asyncio.sleep(interval)
            due = self.next_due()
            if ready() and due is not None and due <= time.time():
                await put(item)

    def __len__(self) -> int:
        return len(self._heap)
