"""The timer loop: due deadlines from execution states become TimerFired messages on the execution's key.

The deadlines themselves live in the states (durable); this heap is only a schedule, rebuilt from the
states on restart. A deadline that moved or was cleared makes a stale TimerFired, which the fold ignores.
One `loop.call_at` handle for the earliest deadline: no task to cancel, nothing to leak on shutdown.
"""
from __future__ import annotations

import asyncio
import heapq
import time
from typing import Callable

from noetl_common.messages import TimerFired


class TimerLoop:
    def __init__(self, fire: Callable[[TimerFired], None]) -> None:
        self._fire = fire
        self._heap: list[tuple[float, str, str]] = []
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for: float | None = None
        self._stopped = False

    def schedule(self, execution_id: str, key: str, due: float) -> None:
        heapq.heappush(self._heap, (due, execution_id, key))
        self._arm()

    def stop(self) -> None:
        self._stopped = True
        if self._handle is not None:
            self._handle.cancel()

    def _arm(self) -> None:
        if self._stopped or not self._heap:
            return
        due = self._heap[0][0]
        if self._armed_for is not None and self._armed_for <= due:
            return                                    # already armed for something earlier
        if self._handle is not None:
            self._handle.cancel()
        loop = asyncio.get_running_loop()
        self._armed_for = due
        self._handle = loop.call_at(loop.time() + max(due - time.time(), 0.0), self._run_due)

    def _run_due(self) -> None:
        self._handle, self._armed_for = None, None
        now = time.time()
        while self._heap and self._heap[0][0] <= now:
            due, execution_id, key = heapq.heappop(self._heap)
            self._fire(TimerFired(execution_id=execution_id, timer=key, time=max(now, due)))
        self._arm()
