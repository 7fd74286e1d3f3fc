"""The in-memory bus: Kafka's publish/consume shape inside one process.

Messages travel as bytes (through noetl_common.codec) so that a value that cannot be serialised fails here
exactly as it would on Kafka. One asyncio queue per topic; consumers take batches.
"""
from __future__ import annotations

import asyncio
from collections import defaultdict


class InMemoryBus:
    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue[tuple[str, bytes]]] = defaultdict(asyncio.Queue)

    def publish(self, topic: str, key: str, value: bytes) -> None:
        self._queues[topic].put_nowait((key, value))

    async def take(self, topic: str, max_messages: int = 1000) -> list[tuple[str, bytes]]:
        """Wait for at least one message, then return everything queued up to `max_messages`."""
        queue = self._queues[topic]
        batch = [await queue.get()]
        while len(batch) < max_messages and not queue.empty():
            batch.append(queue.get_nowait())
        return batch

    def backlog(self, topic: str) -> int:
        return self._queues[topic].qsize()
