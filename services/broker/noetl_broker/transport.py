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
"""
from __future__ import annotations

from typing import Any, ClassVar

import faust
from faust.transport.drivers import aiokafka as driver
from faust.types import TP

from noetl_runtime import kafka_io


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    fetch_max_wait_ms: ClassVar[int] = 10

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads it when it builds its Fetcher in start(), which has not happened yet
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms
        return consumer


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


