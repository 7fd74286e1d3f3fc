"""noetl_runtime.kafka_io against a real Kafka protocol broker (Tansu unless told otherwise).

Tansu rules (architecture §5): unique topics and groups per test, consumers start at "earliest", no
assertions on end offsets or lag. Every wait polls with a deadline.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import pytest

pytest.importorskip("aiokafka", reason="the [kafka] extra is not installed")

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition  # noqa: E402

from noetl_common.codec import DecodeError, decode_command, decode_event, decode_inbound, encode  # noqa: E402
from noetl_common.messages import (  # noqa: E402
    ActionCompleted, ActionSpec, Command, Event, StartExecution,
)
from noetl_common.topics import Topics  # noqa: E402
from noetl_runtime import kafka_io  # noqa: E402
from noetl_runtime.kafka_io import DeadLetter  # noqa: E402

pytestmark = pytest.mark.kafka

DEADLINE = 15.0
T0 = 1_700_000_000.0


async def take(consumer: AIOKafkaConsumer, n: int, deadline: float = DEADLINE) -> list[ConsumerRecord]:
    """The next `n` records (in arrival order per partition), failing after `deadline` seconds."""
    got: list[ConsumerRecord] = []
    end = time.monotonic() + deadline
    while len(got) < n:
        assert time.monotonic() < end, f"got {len(got)} of {n} records within {deadline}s"
        batches = await consumer.getmany(timeout_ms=200, max_records=n - len(got))
        for records in batches.values():
            got.extend(records)
    return got


async def nothing_more(consumer: AIOKafkaConsumer, quiet_ms: int = 1000) -> list[ConsumerRecord]:
    """Whatever arrives within `quiet_ms` (expected: nothing)."""
    extra: list[ConsumerRecord] = []
    end = time.monotonic() + quiet_ms / 1000
    while time.monotonic() < end:
        for records in (await consumer.getmany(timeout_ms=100)).values():
            extra.extend(records)
    return extra


def start(execution_id: str, i: int = 0) -> StartExecution:
    return StartExecution(execution_id=execution_id, time=T0 + i, path="demo/hello",
                          playbook={"apiVersion": "noetl.io/v1", "kind": "Playbook"}, payload={"i": i})


def command(execution_id: str) -> Command:
    return Command(command_id=f"{execution_id}:step:0:1", execution_id=execution_id, step="step", visit=0,
                   attempt=1, action=ActionSpec(type="python", data={"x": [1, 2.5, "é", None]}),
                   time=T0, lease_seconds=30.0)


def event(execution_id: str, seq: int) -> Event:
    return Event(event_id=f"{execution_id}:{seq}", execution_id=execution_id, seq=seq,
                 event_type="step_started", node_name="step", node_type="step", status="STARTED",
                 timestamp="2023-11-14T22:13:20+00:00", time=T0, meta={"nested": {"k": [1, {"z": True}]}})


async def test_round_trip_through_codec(kafka_settings: Any, topics: Topics) -> None:
    created = await kafka_io.ensure_topics(kafka_settings, topics, ["default"], partitions=3)
    assert set(created) == set(kafka_io.all_topic_names(topics, ["default"]))
    assert await kafka_io.ensure_topics(kafka_settings, topics, ["default"], partitions=3) == []

    inbound = [start(f"ex-{i % 4}", i) for i in range(12)]
    inbound.append(ActionCompleted(execution_id="ex-0", command_id="ex-0:step:0:1", time=T0, result={"ok": 1}))
    commands = [command(f"ex-{i}") for i in range(3)]
    events = [event("ex-0", seq) for seq in range(5)]

    producer = kafka_io.make_producer(kafka_settings)
    await producer.start()
    try:
        for topic, messages in ((topics.requests, inbound), (topics.commands(), commands), (topics.events, events)):
            for message in messages:
                await producer.send(topic, encode(message), key=message.execution_id.encode())
        await producer.flush()
    finally:
        await producer.stop()

    consumer = kafka_io.make_consumer(kafka_settings, [topics.requests, topics.commands(), topics.events],
                                      f"{topics.prefix}g")
    await consumer.start()
    try:
        records = await take(consumer, len(inbound) + len(commands) + len(events))
    finally:
        await consumer.stop()

    decoders = {topics.requests: decode_inbound, topics.commands(): decode_command, topics.events: decode_event}
    by_topic: dict[str, list[Any]] = {}
    partition_of: dict[tuple[str, bytes], int] = {}
    for record in records:
        decoded = decoders[record.topic](record.value)
        assert record.key == decoded.execution_id.encode()
        # One key, one partition: the precondition of "one writer per execution" (§2.1).
        assert partition_of.setdefault((record.topic, record.key), record.partition) == record.partition
        by_topic.setdefault(record.topic, []).append(decoded)

    assert sorted(by_topic[topics.requests], key=repr) == sorted(inbound, key=repr)
    assert sorted(by_topic[topics.commands()], key=repr) == sorted(commands, key=repr)
    assert by_topic[topics.events] == events          # one key: per-partition order is production order
    for execution_id in ("ex-0", "ex-1"):
        sent = [m for m in inbound if m.execution_id == execution_id]
        assert [m for m in by_topic[topics.requests] if m.execution_id == execution_id] == sent


async def test_ensure_topics_refuses_what_real_kafka_would(kafka_settings: Any, topics: Topics) -> None:
    # Tansu would create these; a real cluster would not.
    with pytest.raises(ValueError, match="illegal Kafka topic names"):
        await kafka_io.ensure_topics(kafka_settings, Topics(prefix=f"{topics.prefix}bad/"), [])
    with pytest.raises(ValueError, match="at least 1"):
        await kafka_io.ensure_topics(kafka_settings, topics, [], partitions=0)


async def test_restarted_consumer_resumes_after_committed_offset(kafka_settings: Any, topics: Topics) -> None:
    await kafka_io.ensure_topics(kafka_settings, topics, [], partitions=3)
    sent = [start(f"ex-{i % 5}", i) for i in range(20)]
    producer = kafka_io.make_producer(kafka_settings)
    await producer.start()
    try:
        for message in sent:
            await producer.send_and_wait(topics.requests, encode(message), key=message.execution_id.encode())
    finally:
        await producer.stop()

    group = f"{topics.prefix}broker"
    first = kafka_io.make_consumer(kafka_settings, [topics.requests], group)
    await first.start()
    try:
        records = await take(first, len(sent))
        # "Process" everything, but commit only the effects of the first 12 (at-least-once, §2.6): records
        # are produced sequentially, so those are a prefix of every partition.
        done: dict[TopicPartition, int] = {}
        for record in records:
            if decode_inbound(record.value).payload["i"] < 12:
                tp = TopicPartition(record.topic, record.partition)
                done[tp] = max(done.get(tp, 0), record.offset + 1)
        await first.commit(done)
        for tp, offset in done.items():
            assert await first.committed(tp) == offset
    finally:
        await first.stop()      # auto-commit is off: stopping commits nothing more

    second = kafka_io.make_consumer(kafka_settings, [topics.requests], group)
    await second.start()
    try:
        resumed = await take(second, len(sent) - 12)
        resumed += await nothing_more(second)
    finally:
        await second.stop()
    got = sorted(decode_inbound(r.value).payload["i"] for r in resumed)
    assert got == list(range(12, 20)), "committed records re-delivered or uncommitted ones lost"


async def test_malformed_record_goes_to_dlq_and_consumer_moves_on(kafka_settings: Any, topics: Topics) -> None:
    await kafka_io.ensure_topics(kafka_settings, topics, [], partitions=3)
    key = b"ex-dlq"
    bad_json = b'{"kind": "start", "execution_id": '
    bad_shape = b'{"kind": "start", "execution_id": "ex-dlq"}'
    values = [encode(start("ex-dlq", 0)), bad_json, bad_shape, b"\xff\xfe", encode(start("ex-dlq", 1))]

    producer = kafka_io.make_producer(kafka_settings)
    await producer.start()
    consumer = kafka_io.make_consumer(kafka_settings, [topics.requests], f"{topics.prefix}broker")
    await consumer.start()
    try:
        for value in values:
            await producer.send_and_wait(topics.requests, value, key=key)

        # The consumer loop every service runs: decode, dead-letter what cannot be decoded, commit, go on.
        decoded: list[Any] = []
        positions: list[tuple[int, int]] = []
        for record in await take(consumer, len(values)):
            positions.append((record.partition, record.offset))
            try:
                decoded.append(decode_inbound(record.value))
            except DecodeError as exc:
                await kafka_io.send_dead_letter(producer, topics, record.key, record.value, str(exc), record.topic,
                                                source_partition=record.partition, source_offset=record.offset)
            tp = TopicPartition(record.topic, record.partition)
            await consumer.commit({tp: record.offset + 1})
        assert [m.payload["i"] for m in decoded] == [0, 1]
        assert len({p for p, _ in positions}) == 1
        assert [o for _, o in positions] == sorted(o for _, o in positions)
        last_partition, last_offset = positions[-1]
        assert await consumer.committed(TopicPartition(topics.requests, last_partition)) == last_offset + 1
    finally:
        await consumer.stop()
        await producer.stop()

    dlq = kafka_io.make_consumer(kafka_settings, [topics.dlq], f"{topics.prefix}operators")
    await dlq.start()
    try:
        letters = await take(dlq, 3)
        letters += await nothing_more(dlq, 500)
    finally:
        await dlq.stop()
    assert len(letters) == 3
    assert {r.key for r in letters} == {key}
    parsed = sorted((DeadLetter.model_validate_json(r.value) for r in letters), key=lambda d: d.source_offset or 0)
    assert [d.original_value() for d in parsed] == [bad_json, bad_shape, b"\xff\xfe"]
    assert [d.source_offset for d in parsed] == [o for _, o in positions[1:4]]
    for letter in parsed:
        assert letter.source_topic == topics.requests
        assert letter.source_partition == positions[0][0]
        assert letter.original_key() == key
        assert letter.time > 0 and letter.timestamp.endswith("+00:00")
    reasons = [letter.reason for letter in parsed]
    assert all(reason.startswith(("invalid message", "undecodable message")) for reason in reasons)
    assert "Invalid JSON" in reasons[0] and "Field required" in reasons[1]


async def test_round_trip_latency_floor(kafka_settings: Any, topics: Topics, capsys: pytest.CaptureFixture[str],
                                        record_property: Any) -> None:
    """The raw produce → consume round trip, one message at a time: the floor the benchmarks compare to."""
    n, warmup = 500, 20
    await kafka_io.ensure_topics(kafka_settings, topics, ["default"], partitions=3)
    value = encode(command("ex-latency"))
    producer = kafka_io.make_producer(kafka_settings)
    consumer = kafka_io.make_consumer(kafka_settings, [topics.commands()], f"{topics.prefix}worker")
    await producer.start()
    await consumer.start()
    try:
        samples: list[float] = []
        for i in range(warmup + n):      # the warm-up also waits out the group join
            began = time.perf_counter()
            await producer.send_and_wait(topics.commands(), value, key=b"ex-latency")
            (record,) = await take(consumer, 1)
            if i >= warmup:
                samples.append(time.perf_counter() - began)
            assert record.value == value
    finally:
        await consumer.stop()
        await producer.stop()

    samples.sort()
    p50, p99 = samples[n // 2] * 1e3, samples[int(n * 0.99) - 1] * 1e3
    mean, worst = statistics.fmean(samples) * 1e3, samples[-1] * 1e3
    record_property("kafka_round_trip_ms", {"p50": p50, "p99": p99, "mean": mean, "max": worst})
    with capsys.disabled():
        print(f"\nkafka round trip ({len(value)} B, {n} sequential): p50 {p50:.2f} ms  p99 {p99:.2f} ms  "
              f"mean {mean:.2f} ms  max {worst:.2f} ms")
    assert p50 < 100, "a produce → consume round trip should take milliseconds"
