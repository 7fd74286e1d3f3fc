"""The query service's Kafka consumer: noetl.events (and noetl.catalog) -> the Postgres projection.

    consumer = QueryConsumer(settings, Projector(pool, schema))
    await consumer.start() ... await consumer.stop()       # or: await consumer.run() until stop()

One loop, one batch at a time (`getmany`), per batch:

    1. decode every record (`codec.decode_event`; catalog records as `ports.CatalogEntry`); a record that
       does not decode goes to noetl.dlq with the reason (`kafka_io.send_dead_letter`, acked);
    2. `Projector.apply(events)` and `apply_catalog(entries)`: one Postgres transaction each;
    3. commit the batch's offsets, only now (architecture §2.6: at-least-once).

A crash between 2 and 3 redelivers the batch; the projector is idempotent (upsert by event id, rows
recomputed from the stored log), so nothing changes twice. The same argument covers a restart of the
service, a reset of the consumer group, a second group replaying the topic from offset 0, and a rebalance
that moves a partition while its batch is being applied (the commit fails, the new owner re-applies).

Postgres errors: a refused batch (a data or constraint error: an event that decodes but that Postgres
cannot store, e.g. a timestamp it cannot parse) is applied again one event at a time, and each event that is
still refused goes to the DLQ with Postgres' reason, so its partition keeps flowing. Any other error (the
database unreachable, restarting) is retried with backoff on the same batch, without committing, until it
works or the service stops.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from pydantic import ValidationError

from noetl_common.codec import DecodeError, decode_event
from noetl_common.ports import CatalogEntry
from noetl_query.projector import Projector
from noetl_runtime import kafka_io
from noetl_runtime.settings import Settings

log = logging.getLogger("noetl.query.consumer")

RETRY_FIRST, RETRY_MAX = 0.2, 5.0      # seconds between attempts of a batch while Postgres is unavailable


def group_id(settings: Settings) -> str:
    """The projection's consumer group (noetl_common.topics); NOETL_QUERY_GROUP overrides its name."""
    if not settings.query_group:     # unset (or set empty): the default name
        return settings.topics.query_group()
    return settings.topics.query_group(settings.query_group)


def _decode_entry(raw: bytes) -> CatalogEntry:
    try:
        return CatalogEntry.model_validate_json(raw)
    except ValidationError as exc:
        raise DecodeError(f"invalid catalog entry: {exc.error_count()} error(s): {exc.errors()[0]['msg']} "
                          f"at {'.'.join(map(str, exc.errors()[0]['loc']))}") from exc


def _refused(exc: BaseException) -> bool:
    """Postgres refused the data itself (retrying the same rows cannot help): SQLSTATE classes 22 and 23."""
    import asyncpg

    return isinstance(exc, (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError))


class QueryConsumer:
    def __init__(self, settings: Settings, projector: Projector, *, group: str | None = None,
                 batch_size: int = 1000, poll_timeout_ms: int = 200, catalog: bool = True) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.projector = projector
        self.group = group or group_id(settings)
        self.batch_size = batch_size
        self.poll_timeout_ms = poll_timeout_ms
        self.sources = [self.topics.events] + ([self.topics.catalog] if catalog else [])
        self.consumer: Any = None
        self.producer: Any = None
        self.joined = False
        self.stats = {"records": 0, "events": 0, "catalog": 0, "dead_letters": 0, "batches": 0, "retries": 0}
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.producer = kafka_io.make_producer(self.settings)
        await self.producer.start()
        self.consumer = kafka_io.make_consumer(self.settings, [], self.group)
        self.consumer.subscribe(self.sources, listener=_Rebalance(self))
        await self.consumer.start()
        self._task = asyncio.create_task(self._loop(), name="query-consume")
        log.info("projecting %s in group %s", self.sources, self.group)

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The consume loop: done only after stop(), or when it failed."""
        return self._task

    def not_ready(self) -> str | None:
        if self._stop.is_set():
            return "stopping"
        if self._task is not None and self._task.done():
            return "the consumer stopped"
        if not self.joined:
            return f"not yet in consumer group {self.group}"
        return None

    async def stop(self) -> None:
        """Finish the batch in hand (applied and committed), leave the group, flush the producer."""
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None

    async def run(self) -> None:
        await self.start()
        try:
            await self._task   # type: ignore[misc]
        finally:
            await self.stop()

    # ------------------------------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        while not self._stop.is_set():
            batch = await self.consumer.getmany(timeout_ms=self.poll_timeout_ms, max_records=self.batch_size)
            if not batch:
                continue
            if not await self._handle([r for records in batch.values() for r in records]):
                return                        # stopped while Postgres was unavailable: nothing committed
            await self._commit({tp: records[-1].offset + 1 for tp, records in batch.items() if records})

    async def _handle(self, records: Sequence[ConsumerRecord]) -> bool:
        """Decode, dead-letter, apply. False when stopped before the batch could be applied."""
        events: list[tuple[ConsumerRecord, Any]] = []
        entries: list[tuple[ConsumerRecord, Any]] = []
        for record in records:
            try:
                if record.topic == self.topics.catalog:
                    entries.append((record, _decode_entry(record.value or b"")))
                else:
                    events.append((record, decode_event(record.value or b"")))
            except DecodeError as exc:
                await self._dead_letter(record, str(exc))
        if events and not await self._apply(events, self.projector.apply, "events"):
            return False
        if entries and not await self._apply(entries, self.projector.apply_catalog, "catalog"):
            return False
        self.stats["records"] += len(records)
        self.stats["batches"] += 1
        return True

    async def _apply(self, items: list[tuple[ConsumerRecord, Any]],
                     apply: Callable[[list[Any]], Awaitable[int]], stat: str) -> bool:
        """apply(all items) in one transaction; if Postgres refuses the data, item by item, dead-lettering
        the items it still refuses."""
        async def attempt(chunk: list[Any]) -> None:
            self.stats[stat] += await apply(chunk)

        try:
            return await self._retrying(lambda: attempt([item for _, item in items]))
        except Exception as exc:
            if not _refused(exc):
                raise
            log.warning("Postgres refused a batch of %d %s records (%s): applying them one by one",
                        len(items), stat, exc)
        for record, item in items:
            try:
                if not await self._retrying(lambda: attempt([item])):
                    return False
            except Exception as exc:
                if not _refused(exc):
                    raise
                await self._dead_letter(record, f"refused by the projection: {type(exc).__name__}: {exc}")
        return True

    async def _retrying(self, attempt: Any) -> bool:
        """Run `attempt()` until it succeeds; a refused batch raises; other errors are retried with backoff.
        False when stopped first."""
        delay = RETRY_FIRST
        while True:
            try:
                await attempt()
                return True
            except Exception as exc:
                if _refused(exc):
                    raise
                self.stats["retries"] += 1
                log.warning("projection failed, retrying in %.1fs: %r", delay, exc)
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
                return False
            except asyncio.TimeoutError:
                delay = min(RETRY_MAX, delay * 2)

    async def _dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        await kafka_io.send_dead_letter(self.producer, self.topics, record.key, record.value, reason, record.topic,
                                        source_partition=record.partition, source_offset=record.offset)
        self.stats["dead_letters"] += 1
        log.warning("dead-lettered %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        try:
            await self.consumer.commit({tp: OffsetAndMetadata(offset, "") for tp, offset in offsets.items()})
        except (CommitFailedError, KafkaError) as exc:
            # The partitions moved (a rebalance) or the coordinator is away: the next owner re-applies
            # from the last commit, which the projector absorbs.
            log.warning("offset commit failed (the batch will be re-applied, harmlessly): %r", exc)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, consumer: QueryConsumer) -> None:
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        pass   # nothing in flight: a batch is applied and committed before the next poll

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.consumer.joined = True
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
