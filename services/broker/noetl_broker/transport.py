"""faust's Kafka transport with three changes, all about the cost of moving a record from Kafka to the agent.

1. How long a fetch may wait on the server for data. faust hard-codes `fetch_max_wait_ms=1500` for its consumer. A real Kafka broker answers a waiting fetch as
soon as data arrives, so that is only an upper bound there; Tansu does not (measured with aiokafka 0.14: a
message produced into an idle partition is delivered ~40 % of the wait later: ~700 ms at 1500, ~200 ms at
500, ~5 ms at 10). Every step of every execution crosses the broker's consumer, so the wait is
NOETL_KAFKA_FETCH_MAX_WAIT_MS (default 10, the setting every consumer uses): on Kafka the cost is a few more (empty) fetch requests per second.

2. faust's fetch loop hands every record to the conductor as
   `await self.wait_first(callback(message), self.suspend_flow.wait())`, which wraps both in tasks and
   waits on them: two tasks and an `asyncio.wait` per record, measured at a third of the broker's CPU time.
   Only a suspended flow (a rebalance) needs that race; while the flow runs, the callback is awaited inline.

3. faust "pauses" a partition only in its own bookkeeping (it stops asking aiokafka for its records); aiokafka
   keeps fetching it. After recovery faust pauses the table's changelog partitions that way, so the broker's
   own snapshot writes came back into aiokafka's fetcher and sat there unread; a partition with unread records
   holds back every fetch to its node for aiokafka's prefetch backoff (100 ms). Measured on Tansu: a 95–120 ms
   stall of the inbound topics about once a second (the p99 of a step-to-step transition). Pausing and
   resuming a changelog partition is therefore also done in aiokafka, in the consumer's thread.

Two more are about records faust fetched and then dropped without a seek that reads them again (observed: a
broker restarted while a worker's facts waited in noetl.results never folded them, and the execution stalled
until its lease expired; tests/integration/test_server_kafka.py's crash-restart test, 1 run in 10 under load;
the third fix of docs/broker.md, stopping the flow during the end of a recovery, is in Broker.on_recovered):

4. faust hands aiokafka its live set of active partitions for the fetch; the set may become empty before the
   consumer thread uses it (right after table recovery faust pauses the changelog partitions, the inbound ones
   are still paused), and aiokafka reads an empty set as "every partition". aiokafka then returned (and moved
   past) the inbound records, faust dropped them as not active. The fetch now gets a view of the live set
   that is never "everything".
5. faust's "seek to the committed offsets" leaves a partition without a committed offset where it is (aiokafka
   seeks only to offsets > 0), so a record taken and dropped before the partition's first commit was never
   read again. Those partitions now go back to their beginning, where a fresh consumer starts
   (`consumer_auto_offset_reset="earliest"`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import faust
from faust.transport.drivers import aiokafka as driver
from faust.types import TP

from noetl_runtime import kafka_io


class _Only:
    """The partitions a fetch may return: faust's live set of active partitions (a partition resumed while
    the fetch waits is seen at once), but never "all of them", which is what aiokafka's
    `Fetcher.fetched_records` makes of an empty set (see 4. above)."""
    __slots__ = ("tps",)

    def __init__(self, tps: Any) -> None:
        self.tps = tps

    def __bool__(self) -> bool:
        return True

    def __contains__(self, tp: object) -> bool:
        return tp in self.tps


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    fetch_max_wait_ms: ClassVar[int] = 10

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads it when it builds its Fetcher in start(), which has not happened yet
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms
        return consumer

    async def _fetch_records(self, consumer: Any, active_partitions: Any, timeout: float | None = None,
                             max_records: int | None = None) -> Any:
        if active_partitions is not None:   # None: a client-only app, every partition (not the broker)
            active_partitions = _Only(active_partitions)
        return await driver.AIOKafkaConsumerThread._fetch_records(self, consumer, active_partitions,
                                                                  timeout=timeout, max_records=max_records)

    async def seek_to_committed(self) -> Mapping[TP, int]:
        return await self.call_thread(self._seek_to_committed)

    async def _seek_to_committed(self) -> Mapping[TP, int]:
        """aiokafka's seek to the committed offsets, and the beginning for a partition without one (5.)."""
        consumer = self._ensure_consumer()
        committed = await consumer.seek_to_committed()
        fresh = [tp for tp, offset in committed.items()
                 if (offset is None or offset <= 0) and not self.consumer._is_changelog_tp(tp)]
        if fresh:
            await consumer.seek_to_beginning(*fresh)
        return committed


def _set_paused(consumer: Any, tps: set[Any], paused: bool) -> None:
    assigned = consumer.assignment()
    for tp in tps & assigned:   # a rebalance may have taken some since: pausing those would raise
        (consumer.pause if paused else consumer.resume)(tp)


def broker_credentials(settings: Any) -> Any:
    """faust's `broker_credentials` for the shared Kafka security settings (kafka_io.security_options, the
    dict every other client gets), so one set of NOETL_KAFKA_* variables configures every connection.
    faust hands them to its consumer (this module's too) and its producer."""
    options = kafka_io.security_options(settings)
    protocol = options["security_protocol"]
    if protocol.startswith("SASL_"):   # with an ssl_context faust speaks SASL_SSL, without one SASL_PLAINTEXT
        return faust.SASLCredentials(username=options["sasl_plain_username"], password=options["sasl_plain_password"],
                                     mechanism=options["sasl_mechanism"], ssl_context=options.get("ssl_context"))
    if protocol == "SSL":
        return faust.SSLCredentials(options["ssl_context"])
    return None


def transport_class(fetch_max_wait_ms: int) -> type[driver.Transport]:
    """A Transport class whose worker consumer waits at most `fetch_max_wait_ms` per fetch."""
    thread = type("ConsumerThread", (_ConsumerThread,), {"fetch_max_wait_ms": fetch_max_wait_ms})

    class _Consumer(driver.Consumer):
        def _new_consumer_thread(self) -> Any:
            return thread(self, loop=self.loop, beacon=self.beacon)

        async def wait_first(self, *coros: Any, timeout: Any = None) -> Any:
            # the fetch loop's call (see 2. above) is the only one with these two; anything else: faust's way
            if (len(coros) == 2 and self.flow_active and not self.suspend_flow.is_set()
                    and getattr(coros[1], "__qualname__", "").endswith("Event.wait")):
                deliver, suspended = coros
                suspended.close()
                await deliver
                return None
            return await super().wait_first(*coros, timeout=timeout)

        def pause_partitions(self, tps: Any) -> None:
            tps = set(tps)
            super().pause_partitions(tps)
            self._pause_fetching(tps, paused=True)

        def resume_partitions(self, tps: Any) -> None:
            tps = set(tps)
            super().resume_partitions(tps)
            self._pause_fetching(tps, paused=False)

        def _pause_fetching(self, tps: set[TP], *, paused: bool) -> None:
            changelogs = {driver.ensure_aiokafka_TP(tp) for tp in tps if self._is_changelog_tp(tp)}
            thread = getattr(self, "_thread", None)
            consumer = getattr(thread, "_consumer", None)
            if changelogs and consumer is not None and thread.thread_loop is not None:
                # aiokafka's consumer belongs to the consumer thread's loop
                thread.thread_loop.call_soon_threadsafe(_set_paused, consumer, changelogs, paused)

    return type("Transport", (driver.Transport,), {"Consumer": _Consumer})


