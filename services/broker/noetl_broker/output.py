"""The broker's producer: a batch of records out in one go per partition, acknowledged before it returns.

A batch of folded messages yields thousands of records (events, commands, requests, snapshots). Sending them
one by one through faust's producer costs tens of microseconds each (its signals, its buffer task, one
await per record); here they are appended to one aiokafka `BatchBuilder` per topic-partition and submitted
with `send_batch`, then awaited together (acks=all). The partition of a keyed record is the Kafka default
partitioner's (murmur2 of the key), exactly what any other producer of the same key gets.

Its own aiokafka producer, started lazily on first use and stopped with the app: faust's producer keeps
faust's own traffic (assignor, table recovery bookkeeping).
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from noetl_runtime import kafka_io
from noetl_runtime.settings import Settings

MAX_BATCH_BYTES = 512 * 1024   # one BatchBuilder; a partition's records beyond it go in further batches


class Output:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()
        self._partitions: dict[str, list[int]] = {}
        self._key_partition: dict[tuple[int, bytes], int] = {}

    async def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            async with self._starting:
                if self._producer is None:
                    producer = kafka_io.make_producer(self.settings, max_batch_size=MAX_BATCH_BYTES,
                                                      client_id=f"{self.settings.kafka_client_id}-broker")
                    await producer.start()
                    self._producer = producer
        return self._producer

    async def stop(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()   # flushes first

    async def partition(self, topic: str, key: bytes) -> int:
        partitions = self._partitions.get(topic)
        if partitions is None:
            producer = await self.producer()
            partitions = self._partitions[topic] = sorted(await producer.partitions_for(topic))
        n = len(partitions)
        cached = self._key_partition.get((n, key))
        if cached is None:
            if len(self._key_partition) > 100_000:
                self._key_partition.clear()
            cached = self._key_partition[(n, key)] = partitions[(murmur2(key) & 0x7FFFFFFF) % n]
        return cached

    async def send(self, records: Iterable[tuple[str, bytes | None, bytes]], *, last_alone: bool = False) -> None:
        """Produce (topic, key, value) records, in order per partition; return once all are acknowledged."""
        pending = await self.submit(records, last_alone=last_alone)
        if pending:
            await asyncio.gather(*pending)

    async def submit(self, records: Iterable[tuple[str, bytes | None, bytes]], *, last_alone: bool = False
                     ) -> list[asyncio.Future[Any]]:
        """Queue the records in the producer, in order per partition (and after everything queued before);
        return the futures of their acknowledgements. Does not wait for the broker.

        `last_alone`: the last record of each partition goes in a record batch of its own. Tansu answers
        ListOffsets "latest" with the base offset of a partition's last record batch + 1, not its end; faust's
        table recovery reads a changelog up to that "highwater", so the rest of a last multi-record batch would
        be skipped and the newest snapshots lost. With a one-record last batch, that answer is the end.
        """
        producer = await self.producer()
        builders: dict[tuple[str, int], Any] = {}
        pending: list[asyncio.Future[Any]] = []
        if last_alone:
            records = list(records)
            last: dict[tuple[str, int], int] = {}
            keyed: list[tuple[tuple[str, int] | None, str, bytes | None, bytes]] = []
            for topic, key, value in records:
                tp = None if key is None else (topic, await self.partition(topic, key))
                if tp is not None:
                    last[tp] = len(keyed)
                keyed.append((tp, topic, key, value))
            tails = set(last.values())
            records = [r[1:] for i, r in enumerate(keyed) if i not in tails]
            tail_records = [keyed[i][1:] for i in sorted(tails)]
        else:
            tail_records = []
        for topic, key, value in records:
            if key is None:   # unkeyed (a dead letter of an unkeyed record): any partition will do
                pending.append(await producer.send(topic, value))
                continue
            tp = (topic, await self.partition(topic, key))
            builder = builders.get(tp)
            if builder is None:
                builder = builders[tp] = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None) is None:   # full: submit, start another
                pending.append(await producer.send_batch(builder, tp[0], partition=tp[1]))
                builder = builders[tp] = producer.create_batch()
                if builder.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"a record of {len(value)} bytes does not fit in a batch of {MAX_BATCH_BYTES}")
        for (topic, partition), builder in builders.items():
            pending.append(await producer.send_batch(builder, topic, partition=partition))
        for topic, key, value in tail_records:   # after the rest of their partition, one batch each
            assert key is not None
            builder = producer.create_batch()
            builder.append(key=key, value=value, timestamp=None)
            pending.append(await producer.send_batch(builder, topic, partition=await self.partition(topic, key)))
        return pending
