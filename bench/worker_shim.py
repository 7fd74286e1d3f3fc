"""`python -m noetl_worker` with a short consumer fetch wait: a stand-in for a setting the worker lacks.

The worker's consumer takes aiokafka's default fetch_max_wait_ms (500). Tansu answers a waiting fetch only
when that wait is over (docs/kafka.md, noetl_broker/transport.py), so every command would wait ~250 ms on
this Kafka before the worker sees it; a real Kafka answers as soon as data arrives. The broker has
NOETL_BROKER_FETCH_WAIT_MS for this; the worker has no such setting yet, so the benchmark sets the wait here,
from NOETL_BENCH_WORKER_FETCH_WAIT_MS, on the one consumer `kafka_io.make_consumer` makes for the worker.
Everything else is the shipped `noetl_worker.__main__.main`.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from noetl_runtime import kafka_io

_make_consumer = kafka_io.make_consumer
_WAIT = int(os.environ["NOETL_BENCH_WORKER_FETCH_WAIT_MS"])


def _short_wait_consumer(*args: Any, **overrides: Any) -> Any:
    return _make_consumer(*args, **{"fetch_max_wait_ms": _WAIT, **overrides})


kafka_io.make_consumer = _short_wait_consumer   # the worker calls kafka_io.make_consumer at start

if __name__ == "__main__":
    from noetl_worker.__main__ import main
    sys.exit(main())
