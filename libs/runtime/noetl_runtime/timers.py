"""The timer loop: due deadlines from execution states become TimerFired messages on the execution's key.

The deadlines themselves live in the states (durable); this heap is only a schedule, rebuilt from the
states on restart. A deadline that moved or was cleared makes a stale TimerFired, which the fold ignores.
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
        self._wake = asyncio.Event()

    def schedule(self, execution_id: str, key: str, due: float) -> None:
        heapq.heappush(self._heap, (due, execution_id, key))
        self._wake.set()

    async def run(self) -> None:
        while True:
            now = time.time()
            while self._heap and self._heap[0][0] <= now:
                due, execution_id, key = heapq.heappop(self._heap)
                self._fire(TimerFired(execution_id=execution_id, timer=key, time=max(now, due)))
            self._wake.clear()
            delay = self._heap[0][0] - now if self._heap else 3600.0
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(delay, 0.0))
            except asyncio.TimeoutError:
                pass
