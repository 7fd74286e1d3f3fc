"""faust's Kafka transport with two changes, both about the cost of moving a record from Kafka to the agent.

1. How long a fetch may wait on the server for data. faust hard-codes `fetch_max_wait_ms=1500` for its consumer. A real Kafka broker answers a waiting fetch as
soon as data arrives, so that is only an upper bound there; Tansu does not (measured with aiokafka 0.14: a
message produced into an idle partition is delivered ~40 % of the wait later: ~700 ms at 1500, ~200 ms at
500, ~5 ms at 10). Every step of every execution crosses the broker's consumer, so the wait is
NOETL_BROKER_FETCH_WAIT_MS (default 10): on Kafka the cost is a few more (empty) fetch requests per second.

2. faust's fetch loop hands every record to the conductor as
   `await self.wait_first(callback(message), self.suspend_flow.wait())`, which wraps both in tasks and
   waits on them: two tasks and an `asyncio.wait` per record, measured at a third of the broker's CPU time.
   Only a suspended flow (a rebalance) needs that race; while the flow runs, the callback is awaited inline.
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

        async def wait_first(self, *coros: Any, timeout: Any = None) -> Any:
            # the fetch loop's call (see 2. above) is the only one with these two; anything else: faust's way
            if (len(coros) == 2 and self.flow_active and not self.suspend_flow.is_set()
                    and getattr(coros[1], "__qualname__", "").endswith("Event.wait")):
                deliver, suspended = coros
                suspended.close()
                await deliver
                return None
            return await super().wait_first(*coros, timeout=timeout)

    return type("Transport", (driver.Transport,), {"Consumer": _Consumer})
