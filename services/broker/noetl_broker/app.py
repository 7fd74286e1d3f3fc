"""The broker: a faust-streaming app folding noetl.requests + noetl.results into execution state.

    app = create_app(settings)     # a factory: nothing is built at import time

One agent over both inbound topics (raw bytes, key = execution_id) moves each record into the broker's
inbox; the folder task takes batches from it (group commit: everything queued, at most
NOETL_BROKER_BATCH_SIZE; a lone record is folded at once). Per batch, in the folder:

    1. noetl_common.batch.fold_batch: decode, advance() per message, the encoded outputs   (pure, no I/O)
    2. queue the events, commands, requests and dead letters in the producer          (no waiting)
    3. put the changed snapshots in the Table's store, update the timer schedule

and then, in order, in the committer task (so that the folder folds the next batch meanwhile):

    4. wait until Kafka acknowledged all of 2                                          (effects durable)
    5. produce the snapshots to the Table's changelog and wait for the acks           (states durable)
    6. ack the batch's records; faust's commit loop commits their offsets later

A snapshot is therefore never durable before the effects it caused, and an offset is never committed
before both: a crash anywhere replays the uncommitted records, which the fold either re-derives
identically (same ids, so consumers drop the duplicates) or drops as stale. See docs/broker.md.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faust
from faust.types import EventT

from noetl_common.batch import BatchOutput, Record, fold_batch
from noetl_common.state_access import StateCache, TableStates
from noetl_common.codec import encode
from noetl_common.explain import explain
from noetl_common.messages import TimerFired
from noetl_common.state import ExecutionState
from noetl_runtime import kafka_io
from noetl_runtime.settings import engine_caps

from noetl_broker.eviction import Evictions
from noetl_broker.metrics import Metrics
from noetl_broker.output import Output
from noetl_broker.settings import BrokerSettings
from noetl_broker.timers import TimerLoop, partition_of, schedule_of
from noetl_broker.faust_config import app_id, app_options
from noetl_broker.transport import transport_class
from noetl_broker.web import install_views

log = logging.getLogger("noetl.broker")

TABLE = "executions"
EVICT = None          # the inbox item that asks the folder to evict what is due (between batches: one writer)
EVICT_BATCH = 1000    # the most states one eviction removes (the next tick takes the rest)


class _TableView:
    """The table as the batch fold sees it: execution id (str) -> snapshot bytes."""

    def __init__(self, table: Any) -> None:
        self._table = table

    def get(self, key: str, default: Any = None) -> Any:
        return self._table.data.get(key.encode(), default)   # the store itself: see Broker.fold


@dataclass
class _Pending:
    """A folded batch on its way to durability."""
    events: Sequence[tuple[Any, EventT]]   # (the stream it came from, the event): acked once durable
    effects: list[asyncio.Future[Any]]
    states: dict[str, bytes | None]        # None: evicted, a tombstone for the changelog
    started: float


class Broker:
    """Everything the agent, the committer, the timer task and the web views share."""

    def __init__(self, app: faust.App, settings: BrokerSettings, table: Any) -> None:
        self.app = app
        self.settings = settings
        self.topics = settings.topics
        self.table = table
        self.view = _TableView(table)
        self.cache = StateCache(settings.broker_state_cache)
        self.states = TableStates(self.view, self.cache)
        self.metrics = Metrics()
        self.timers = TimerLoop(self.fire, settings.topic_partitions)
        self.evictions = Evictions(settings.broker_evict_after)
        self.output = Output(settings)
        self.known_pools: set[str] = set(settings.pools)
        # NOETL_MAX_VISITS, NOETL_MAX_ITERATOR_ITEMS: the fold records them in each execution it starts here
        self.caps = engine_caps(settings)
        self.recovered = False   # the table is recovered for the current assignment: ready to fold
        self.assigned: set[int] = set()
        self._inbox: asyncio.Queue[tuple[Any, EventT]] | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._slots: asyncio.Semaphore | None = None
        self.inflight = 0        # folded batches not yet durable
        self.folding = False

    def _start(self) -> None:
        """The queues belong to the running loop: made on first use, not in the factory."""
        if self._inbox is None:
            self._inbox = asyncio.Queue(maxsize=2 * self.settings.broker_batch_size)
            self._queue = asyncio.Queue()
            self._slots = asyncio.Semaphore(self.settings.broker_pipeline)

    # ------------------------------------------------------------------------------------------ the agent
    async def pump(self, stream: Any) -> None:
        """The agent's body: every record of the stream into the inbox, unacked (the committer acks it).

        A separate folder (rather than batching inside the agent's iteration) because a batch must close
        as soon as nothing more is waiting, and only the inbox can tell that reliably: faust's own queue
        also holds records its iteration skips (rebalances), which would keep a half-built batch waiting.
        """
        self._start()
        stream.enable_acks = False
        put = self._inbox.put   # type: ignore[union-attr]
        async for event in stream.events():
            await put((stream, event))

    async def folder(self) -> None:
        """Batches from the inbox (everything queued, at most NOETL_BROKER_BATCH_SIZE), folded in order."""
        self._start()
        inbox = self._inbox
        assert inbox is not None
        limit = self.settings.broker_batch_size
        while True:
            batch = [await inbox.get()]
            while len(batch) < limit:
                if inbox.empty():
                    await asyncio.sleep(0)   # one round for the pump and the fetcher: more may be on its way
                    if inbox.empty():
                        break
                batch.append(inbox.get_nowait())
            records = [item for item in batch if item is not EVICT]
            self.folding = True
            try:
                if records:
                    await self.fold(records)
                if len(records) < len(batch):
                    await self.evict()
            finally:
                self.folding = False

    async def fold(self, batch: Sequence[tuple[Any, EventT]]) -> None:
        """Steps 1-3 for one batch; hands it to the committer. Waits only when the pipeline is full."""
        self._start()
        await self._slots.acquire()   # type: ignore[union-attr]
        try:
            started, t0 = time.time(), time.perf_counter()
            records = [Record(value=e.message.value, key=e.message.key, topic=e.message.topic,
                              partition=e.message.partition, offset=e.message.offset,
                              timestamp=e.message.timestamp) for _, e in batch]
            out = fold_batch(self.states, records, now=started, late_start_after=self.settings.broker_evict_after,
                             caps=self.caps)
            t1 = time.perf_counter()
            effects = await self.output.submit(await self._effects(out))
        except BaseException:
            self._slots.release()   # type: ignore[union-attr]
            raise
        # The store is written now (the next batch folds on top of it) and the changelog only once the
        # effects are acknowledged (the committer). Both are written here, not with `table[key] = v`: faust
        # sends that record by record through its buffer task, which cost more than the fold. Recovery
        # reads the changelog as faust writes it: same topic, key, value, and partition (murmur2 of the
        # key, what use_partitioner=True picks).
        store = self.table.data
        for execution_id, raw in out.states.items():
            store[execution_id.encode()] = raw
        for execution_id, timers in out.timers.items():
            self.timers.update(execution_id, timers)
        for execution_id, at in out.finished.items():
            self.evictions.finished(execution_id, at)
        self.inflight += 1
        self._queue.put_nowait(_Pending(batch, effects, out.states, t0))   # type: ignore[union-attr]
        self._count(out, len(records), started, t0, t1)
        stamps = [e.message.timestamp for _, e in batch if e.message.timestamp]
        if stamps:   # producer CreateTime, seconds: how long the oldest record waited for this fold
            self.metrics.last_batch_wait = max(0.0, started - min(stamps))

    async def _effects(self, out: BatchOutput) -> list[tuple[str, bytes | None, bytes]]:
        topics = self.topics
        for pool in {c.pool for c in out.commands} - self.known_pools:
            await kafka_io.ensure_topics(self.settings, topics, [pool], partitions=self.settings.topic_partitions,
                                         replication_factor=self.settings.topic_replication)
            self.known_pools.add(pool)
        records: list[tuple[str, bytes | None, bytes]] = []
        add = records.append
        for event, raw in zip(out.events, out.event_bytes):
            add((topics.events, event.execution_id.encode(), raw))
        for command, raw in zip(out.commands, out.command_bytes):
            add((topics.commands(command.pool), command.execution_id.encode(), raw))
        for request, raw in zip(out.requests, out.request_bytes):
            add((topics.requests, request.execution_id.encode(), raw))
        for letter in out.dead_letters:
            add((topics.dlq, letter.original_key(), encode(letter)))
        return records

    async def evict(self) -> None:
        """Drop the finished states whose grace is over; the committer writes their tombstones to the changelog
        after everything folded before, so a recovery never brings them back."""
        self._start()
        gone = self.evictions.take(self.table.data, self.cache, time.time(), EVICT_BATCH)
        if gone:
            await self._slots.acquire()   # type: ignore[union-attr]
            self.inflight += 1
            self._queue.put_nowait(_Pending((), [], gone, time.perf_counter()))   # type: ignore[union-attr]
            self.metrics.evicted += len(gone)

    def _count(self, out: BatchOutput, size: int, started: float, t0: float, t1: float) -> None:
        self.metrics.folded_batch(out, size, started, t0, t1)
        if out.forged:   # someone holds the worker role (or the results topic) and not the attempt's token
            log.warning("dropped %d fact(s) without their attempt's token", out.forged)
        for letter in out.dead_letters:
            log.warning("dead letter: %s", letter.reason, extra={
                "source_topic": letter.source_topic, "source_partition": letter.source_partition,
                "source_offset": letter.source_offset})
        for failure in out.failures:
            log.error("execution %s %s: %s\n%s", failure.execution_id,
                      "quarantined" if failure.quarantined else "failed by an error of the fold", failure.reason,
                      failure.trace, extra={"execution_id": failure.execution_id})

    # ------------------------------------------------------------------------------------------ the committer
    async def committer(self) -> None:
        """Steps 4-6, batch after batch in fold order (so the changelog gets the snapshots in order)."""
        self._start()
        assert self._queue is not None
        while True:
            pending = await self._queue.get()
            try:
                t0 = time.perf_counter()
                if pending.effects:
                    await asyncio.gather(*pending.effects)
                t1 = time.perf_counter()
                self.metrics.last_effects_ack = t1 - pending.started
                if pending.states:
                    changelog = self.table.changelog_topic.get_topic_name()
                    await self.output.send(((changelog, eid.encode(), raw) for eid, raw in pending.states.items()),
                                           last_alone=self.settings.broker_changelog_last_alone)
                for stream, event in pending.events:
                    await stream.ack(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Nothing of this batch (or later ones) is acked: the worker's replacement replays it.
                log.exception("could not make a batch durable; stopping the broker (it restarts from its last "
                              "commit)")
                await self.app.crash(exc)
                raise
            m = self.metrics
            m.effects_seconds += t1 - t0
            m.states_seconds += time.perf_counter() - t1
            m.batches_durable += 1
            m.durable_latency_seconds += time.perf_counter() - pending.started
            m.last_durable_at = time.time()
            self.inflight -= 1
            self._slots.release()   # type: ignore[union-attr]

    def busy(self) -> bool:
        return bool(self.inflight or self.folding or (self._inbox is not None and not self._inbox.empty()))

    async def settle(self, deadline: float) -> bool:
        """Fold what was taken and wait until it is all durable and acked; False if `deadline` s passed."""
        end = time.monotonic() + deadline
        while self.busy():
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.005)
        return True

    async def fire(self, due: list[TimerFired]) -> None:
        """The timer loop's output: TimerFired requests on the executions' own keys, acknowledged."""
        await self.output.send((self.topics.requests, msg.execution_id.encode(), encode(msg)) for msg in due)
        self.metrics.timers_fired += len(due)

    # ------------------------------------------------------------------------------------------ rebalances
    async def on_recovered(self) -> None:
        """The table is recovered for the new assignment: rebuild the timer schedule from it."""
        consumer = self.app.consumer
        # faust resumed the flow (its fetcher) to read the changelog. Next, in on_recovery_completed, it resumes
        # the inbound partitions, seeks them to the committed offsets and only then resumes the flow, which
        # empties every agent's queue: records fetched in between would be dropped after the seek, never to be
        # read again (faust-streaming/faust#596). With the flow stopped here, nothing is fetched until then.
        consumer.stop_flow()
        n = self.settings.topic_partitions
        for topic in (self.topics.requests, self.topics.results):
            actual = consumer.topic_partitions(topic)
            if actual is not None and actual != n:
                # the snapshots' partitions (and the timer loop's ownership) assume the same count everywhere
                message = (f"{topic} has {actual} partitions but NOETL_TOPIC_PARTITIONS is {n}: every "
                           f"execution-keyed topic and the table's changelog must have the same count")
                log.error(message)
                await self.app.crash(RuntimeError(message))
                return
        self.assigned = {tp.partition for tp in consumer.assignment() if tp.topic == self.topics.requests}
        store = self.table.data
        # faust drops the keys it recovered for partitions that left; the ones this worker wrote itself
        # (Broker.fold) it does not know about: drop those too, they belong to another worker now
        for key in [k for k in list(store.keys()) if partition_of(k.decode(), n) not in self.assigned]:
            del store[key]
        self.cache.clear()
        parsed = [(k.decode(), *schedule_of(v)) for k, v in list(store.items()) if v is not None]
        scheduled = self.timers.replace(((eid, timers, lease) for eid, timers, _, lease in parsed), self.assigned)
        self.evictions.rebuild((eid, at) for eid, _, at, _ in parsed if at is not None)
        self.recovered = True
        log.info("table recovered: partitions %s, %d deadline(s) scheduled", sorted(self.assigned), scheduled)

    async def on_revoked(self) -> None:
        self.recovered = False
        self.timers.revoke()
        self.evictions.revoke()
        # A batch of a revoked partition must be durable before its new owner recovers the changelog:
        # a snapshot written after the new owner's would roll the execution back. The rebalance waits here.
        if not await self.settle(0.8 * self.settings.session_timeout):
            log.error("records taken before the rebalance are not durable yet; stopping the broker rather than "
                      "risk a late snapshot after the new owner's")
            await self.app.crash(RuntimeError("rebalance: in-flight batches did not settle in time"))

    async def explain(self, execution_id: str, now: float) -> dict[str, Any] | None:
        """What an execution of this worker's partitions waits for, from the table's latest snapshot (folded,
        perhaps not yet durable: the freshest view). None when another worker owns it, or it was evicted."""
        raw = self.table.data.get(execution_id.encode())
        if raw is None:
            return None
        return explain(ExecutionState.from_bytes(raw), now).as_json()

    def not_ready(self) -> str | None:
        if not self.recovered:
            return "waiting for a partition assignment and the table's recovery"
        return None


def create_app(settings: BrokerSettings | None = None, **overrides: Any) -> faust.App:
    """The broker app. `overrides` are faust settings (tests, benchmarks)."""
    if settings is None:
        from noetl_broker.settings import load_broker_settings
        settings = load_broker_settings()
    topics = settings.topics
    options = app_options(settings)
    options.update(overrides)
    app = faust.App(app_id(settings), **options)
    # before anything touches app.transport (app.topic does): faust's consumer with a short fetch wait
    app.transport = transport_class(settings.kafka_fetch_max_wait_ms)(app.conf.broker_consumer, app)

    inbound = app.topic(topics.requests, topics.results, key_type=bytes, value_type=bytes,
                        key_serializer="raw", value_serializer="raw")
    table = app.Table(TABLE, default=None, key_type=bytes, value_type=bytes,   # bytes: the "raw" codec
                      partitions=settings.topic_partitions,
                      # the partition of a snapshot is the Kafka partitioner's choice for its key, i.e. the
                      # partition of the execution's requests/results, whatever batch wrote it
                      use_partitioner=True)
    broker = Broker(app, settings, table)
    app.noetl_broker = broker   # type: ignore[attr-defined]

    @app.agent(inbound, name="fold")
    async def fold(stream: Any) -> None:
        await broker.pump(stream)

    @app.task
    async def _folder() -> None:
        try:
            await broker.folder()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The batch's records stay unacked, and nothing after them may be acked either: crash the worker,
            # its replacement replays from the last commit (at-least-once).
            log.exception("batch failed; stopping the broker so that it restarts from its last commit")
            await app.crash(exc)
            raise

    table.on_recover(broker.on_recovered)

    @app.on_partitions_revoked.connect
    async def _revoked(_app: Any, revoked: Any, **_kwargs: Any) -> None:
        await broker.on_revoked()

    @app.task
    async def _committer() -> None:
        await broker.committer()

    @app.task
    async def _timer_loop() -> None:
        await broker.timers.run()

    if broker.evictions.enabled:
        @app.task
        async def _evict_ticker() -> None:
            broker._start()
            await broker.evictions.ticker(lambda: broker.recovered, broker._inbox.put, EVICT)

    @app.on_before_shutdown.connect
    async def _shutdown(_app: Any, **_kwargs: Any) -> None:
        # offsets are committed by now; settling still saves the next owner a replay of what was folded
        await broker.settle(5.0)
        await broker.output.stop()

    if settings.broker_web:
        from noetl_runtime.auth import AuthSettings, check_bind

        auth = AuthSettings()
        check_bind(settings.http_host, auth)   # NOETL_AUTH=off only on a loopback address
        token = settings.broker_token.get_secret_value() if settings.broker_token is not None else None
        if token is None and auth.auth == "on":
            log.warning("NOETL_BROKER_TOKEN is not set: /explain and /metrics answer 401 to everyone")
        install_views(app, broker, token=token, auth_off=auth.auth == "off")
    return app
