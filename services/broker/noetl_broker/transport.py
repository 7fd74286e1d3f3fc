"""faust's Kafka transport with one change: how long a fetch may wait on the server for data.

faust hard-codes `fetch_max_wait_ms=1500` for its consumer. A real Kafka broker answers a waiting fetch as
soon as data arrives, so that is only an upper bound there; Tansu does not (measured with aiokafka 0.14: a
message produced into an idle partition is delivered ~40 % of the wait later: ~700 ms at 1500, ~200 ms at
500, ~5 ms at 10). Every step of every execution crosses the broker's consumer, so the wait is
NOETL_BROKER_FETCH_WAIT_MS (default 10): on Kafka the cost is a few more (empty) fetch requests per second.
"""
from __future__ import annotations

from typing import Any, ClassVar

from faust.transport.drivers import aiokafka as driver


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    fetch_max_wait_ms: ClassVar[int] = 10

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads it when it builds its Fetcher in start(), which has not happened yet
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms
        return consumer


def transport_class(fetch_max_wait_ms: int) -> type[driver.Transport]:
    """A Transport class whose worker consumer waits at most `fetch_max_wait_ms` per fetch."""
    thread = type("ConsumerThread", (_ConsumerThread,), {"fetch_max_wait_ms": fetch_max_wait_ms})

    class _Consumer(driver.Consumer):
        def _new_consumer_thread(self) -> Any:
            return thread(self, loop=self.loop, beacon=self.beacon)

    return type("Transport", (driver.Transport,), {"Consumer": _Consumer})
