"""Which offsets of its partitions the worker may commit, and committing them (at-least-once, invariant 6).

Commands run concurrently, so they finish out of order. Per partition the worker keeps the offsets it took,
in order, and commits only up to the lowest one that has not finished, where "finished" means its final
fact (ActionCompleted, ActionFailed or ChildStarted) was acknowledged by Kafka (acks=all), or its dead
letter was. A crash therefore loses nothing: whatever was not finished is delivered again to the next owner
of the partition, which runs the same attempt (same command_id); the fold keeps the first final fact and
drops the rest as stale.

    offsets = Offsets(revoke_wait=2.0)
    consumer.subscribe([topic], listener=offsets.listener())
    offsets.consumer = consumer
    part = offsets.part(tp)             # None once revoked: the record is left to the new owner
    part.take(offset); ...; offsets.finished(part, offset)
    await offsets.commit_loop(interval) # a task: commits whenever something finished
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

log = logging.getLogger("noetl.worker.service")


class PartitionOffsets:
    """The offsets taken from one partition (in fetch order) and which of them have finished."""

    def __init__(self) -> None:
        self.taken: deque[list[Any]] = deque()   # [offset, finished]
        self.entries: dict[int, list[Any]] = {}
        self.commit_to: int | None = None        # the next offset to read after a restart
        self.committed: int | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    def take(self, offset: int) -> None:
        entry = [offset, False]
        self.taken.append(entry)
        self.entries[offset] = entry

    def finish(self, offset: int) -> bool:
        """Mark done; True when the committable position moved."""
        entry = self.entries.pop(offset, None)
        if entry is None:
            return False
        entry[1] = True
        moved = False
        while self.taken and self.taken[0][1]:
            self.commit_to = self.taken.popleft()[0] + 1
            moved = True
        return moved


class Offsets:
    """The partitions assigned to this worker and their commits. `revoke_wait`: how long a rebalance waits
    for the revoked partitions' running commands before committing what finished."""

    def __init__(self, revoke_wait: float) -> None:
        self.revoke_wait = revoke_wait
        self.consumer: Any = None
        self.joined = False                     # a first assignment came: the worker is in its group
        self._parts: dict[TopicPartition, PartitionOffsets] = {}
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()

    def part(self, tp: TopicPartition) -> PartitionOffsets | None:
        return self._parts.get(tp)

    def finished(self, part: PartitionOffsets, offset: int) -> None:
        if part.finish(offset):
            self._dirty.set()

    def listener(self) -> ConsumerRebalanceListener:
        return _Rebalance(self)

    async def commit_loop(self, interval: float) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self.commit()
            await asyncio.sleep(interval)   # pacing: many completions, one commit

    async def commit(self, parts: Iterable[TopicPartition] | None = None) -> None:
        async with self._lock:
            chosen = {tp: self._parts[tp] for tp in (parts if parts is not None else list(self._parts))
                      if tp in self._parts}
            offsets = {tp: p.commit_to for tp, p in chosen.items()
                       if p.commit_to is not None and p.commit_to != p.committed}
            if not offsets:
                return
            try:
                await self.consumer.commit(offsets)
            except KafkaError as exc:   # a rebalance took the partitions: their records come again
                log.warning("offset commit failed: %r", exc)
                return
            for tp, offset in offsets.items():
                chosen[tp].committed = offset

    async def revoked(self, revoked: set[TopicPartition]) -> None:
        tasks = {t for tp in revoked if tp in self._parts for t in self._parts[tp].tasks}
        if tasks and self.revoke_wait > 0:   # a short wait spares the next owner re-running commands about to finish
            await asyncio.wait(tasks, timeout=self.revoke_wait)
        await self.commit(revoked)
        for tp in revoked:
            self._parts.pop(tp, None)   # tasks still running report, but no longer commit

    def assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self._parts.setdefault(tp, PartitionOffsets())
        self.joined = True
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, offsets: Offsets) -> None:
        self.offsets = offsets

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.offsets.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.offsets.assigned(set(assigned))
