"""The broker's durable timer loop: due deadlines become TimerFired requests on the execution's own key.

The deadlines themselves live in the execution states (`state.timers`), i.e. in the table and its
changelog: that is what makes them durable. This heap is only a schedule of them, for the partitions this
worker owns, rebuilt from the table after every recovery (start, restart, rebalance) and kept up to date by
the agent as states change. After a recovery a lease deadline is held back to one lease after it (the
broker could not hear the workers while it was away). Firing sends `TimerFired(execution_id, timer, time)` to noetl.requests; the fold
drops a TimerFired whose deadline was cleared or moved, so firing twice (e.g. once before a crash and once
after the rebuild) is harmless, and nothing due is ever lost.

No faust import: the app wires `fire` (a produce that waits for the ack) and feeds `update`/`rebuild`.
"""
from __future__ import annotations

import asyncio
import heapq
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from aiokafka.partitioner import murmur2

from noetl_common.engine.leases import recovered_fire_time
from noetl_common.messages import TimerFired

log = logging.getLogger("noetl.broker.timers")
Fire = Callable[[list[TimerFired]], Awaitable[None]]
RETRY_AFTER = 0.5   # seconds before a deadline whose TimerFired could not be produced is tried again


def schedule_of(raw: bytes) -> tuple[dict[str, float], float | None, float]:
    """A snapshot's live deadlines, when it finished (None while it runs) and its lease: one parse, for a
    recovery.

    A snapshot that cannot be read here has neither: it stays in the table untouched until a message for
    its execution arrives, and the batch fold then quarantines the execution (noetl_common.batch)."""
    try:
        data = json.loads(raw)
        lease = float(data.get("lease_seconds") or 0.0)
        if data.get("status") == "RUNNING":
            return {str(key): float(due) for key, due in (data.get("timers") or {}).items()}, None, lease
        finished = data.get("finished")
        return {}, float(finished if finished is not None else data.get("started") or 0.0), lease
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        log.error("an execution snapshot cannot be read (%s): no deadline scheduled for it", exc)
        return {}, None, 0.0


def partition_of(execution_id: str, partitions: int) -> int:
    """The partition the Kafka default partitioner (murmur2, as aiokafka and the Java client) picks for this
    key: where every message of the execution, and its table entry, lives."""
    return (murmur2(execution_id.encode()) & 0x7FFFFFFF) % partitions


class TimerLoop:
    def __init__(self, fire: Fire, partitions: int, clock: Callable[[], float] = time.time) -> None:
        self._fire = fire
        self._partitions = partitions
        self._clock = clock
        self._heap: list[tuple[float, str, str, float]] = []   # (fire at, execution id, key, deadline)
        self._current: dict[str, dict[str, float]] = {}   # execution id -> its live deadlines
        self._owned: set[int] | None = None                 # None: every partition (before the first assignment)
        self._wake: asyncio.Event | None = None
        self.fired = 0

    # ------------------------------------------------------------------------------------------ schedule
    def update(self, execution_id: str, timers: dict[str, float]) -> None:
        """The execution's deadlines after a batch (empty: none left, or it finished)."""
        previous = self._current.pop(execution_id, {})
        if timers:
            self._current[execution_id] = dict(timers)
        earliest = None
        for key, due in timers.items():
            if previous.get(key) != due:
                heapq.heappush(self._heap, (due, execution_id, key, due))
                earliest = due if earliest is None else min(earliest, due)
        if earliest is not None and self._heap[0][0] >= earliest:
            self._poke()   # a new head: the loop may be sleeping towards a later one

    def rebuild(self, snapshots: Iterable[tuple[str, bytes]], owned: set[int]) -> int:
        """Replace the schedule with the deadlines of these snapshots (the table after a recovery)."""
        parsed = ((eid, schedule_of(raw)) for eid, raw in snapshots if raw is not None)
        return self.replace(((eid, timers, lease) for eid, (timers, _, lease) in parsed), owned)

    def replace(self, schedules: Iterable[tuple[str, dict[str, float], float]], owned: set[int]) -> int:
        """Replace the schedule with these executions' (deadlines, lease) (parsed from the table after a
        recovery). A lease deadline fires no sooner than one lease from now (leases.recovered_fire_time): the
        heartbeats and results that waited while this worker did not own the partition come first."""
        self._owned = set(owned)
        self._heap.clear()
        self._current.clear()
        now = self._clock()
        for execution_id, timers, lease_seconds in schedules:
            if partition_of(execution_id, self._partitions) not in self._owned:
                continue
            if timers:
                self._current[execution_id] = timers
                self._heap.extend((recovered_fire_time(key, due, lease_seconds, now), execution_id, key, due)
                                  for key, due in timers.items())
        heapq.heapify(self._heap)
        self._poke()
        return len(self._heap)

    def revoke(self) -> None:
        """Partitions are being reassigned: fire nothing until the next rebuild says what is ours."""
        self._owned = set()
        self._heap.clear()
        self._current.clear()

    def pending(self) -> int:
        return sum(len(t) for t in self._current.values())

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------------------------------------ loop
    async def run(self) -> None:
        """Sleep until the earliest deadline (or a new earlier one), fire what is due, forever."""
        self._wake = asyncio.Event()
        while True:
            self._wake.clear()
            now = self._clock()
            due, deadlines = self._take_due(now)
            if due:
                try:
                    await self._fire(due)
                    self.fired += len(due)
                except asyncio.CancelledError:
                    raise
                except Exception:   # the bus is down: keep the deadlines, try again shortly
                    log.exception("could not produce %d timer_fired request(s); retrying", len(due))
                    for msg, deadline in zip(due, deadlines):
                        heapq.heappush(self._heap, (now + RETRY_AFTER, msg.execution_id, msg.timer, deadline))
                continue
            delay = self._heap[0][0] - now if self._heap else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass

    def _take_due(self, now: float) -> tuple[list[TimerFired], list[float]]:
        fired: list[TimerFired] = []
        deadlines: list[float] = []
        while self._heap and self._heap[0][0] <= now:
            _at, execution_id, key, due = heapq.heappop(self._heap)
            if self._current.get(execution_id, {}).get(key) != due:
                continue   # cleared or moved since (a moved deadline has its own heap entry)
            if self._owned is not None and partition_of(execution_id, self._partitions) not in self._owned:
                continue
            fired.append(TimerFired(execution_id=execution_id, timer=key, time=max(now, due)))
            deadlines.append(due)
        return fired, deadlines
