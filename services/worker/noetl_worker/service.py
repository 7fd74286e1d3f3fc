"""The Kafka worker: a consumer group per pool on `noetl.commands.<pool>`, each command run by `execute`.

    service = WorkerService(settings, ports_factory)   # ports_factory(emit) -> WorkerPorts
    await service.run()                                 # until SIGTERM/SIGINT; or start() ... stop()

Routing of what `execute` emits: StartExecution (a child playbook) -> noetl.requests, every fact
(ActionStarted/Completed/Failed, heartbeats, ChildStarted) -> noetl.results; both keyed by execution_id.
A record that does not decode as a Command goes to noetl.dlq with the reason; its partition keeps flowing.

Offsets (architecture invariant 6, at-least-once): a record's offset is committed once its final fact
(ActionCompleted, ActionFailed or ChildStarted) or its dead letter was acknowledged by Kafka, and only up
to the lowest offset of its partition still running (offsets.py). A final fact that cannot be sent is
retried while the worker lives; if it never goes out, its offset stays uncommitted.

Alongside: options.py (WorkerOptions, NOETL_WORKER_*), metrics.py (the counters), http_server.py (/health,
/ready, /metrics).

Shutdown (SIGTERM/SIGINT): stop fetching, give in-flight commands `shutdown_grace` seconds, cancel the
rest (uncommitted: redelivered elsewhere), commit, leave the group, flush the producer. A second signal
skips the grace.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError
from pydantic import BaseModel

from noetl_common.topics import Topics
from noetl_common.codec import DecodeError, decode_command, encode
from noetl_common.messages import ActionCompleted, ActionFailed, ChildStarted, Command, StartExecution
from noetl_common.ports import Emit
from noetl_runtime import kafka_io
from noetl_runtime.settings import Settings
from noetl_worker.execute import execute
from noetl_worker.http_server import OpsServer, ops_app
from noetl_worker.metrics import WorkerMetrics
from noetl_worker.offsets import Offsets, PartitionOffsets
from noetl_worker.options import WorkerOptions
from noetl_worker.ports import WorkerPorts

__all__ = ["PortsFactory", "WorkerOptions", "WorkerService", "group_id"]   # WorkerOptions: imported from here too

log = logging.getLogger("noetl.worker.service")

PortsFactory = Callable[[Emit], WorkerPorts]
_FINAL = (ActionCompleted, ActionFailed, ChildStarted)
_REMEMBER_FINISHED = 10_000   # command ids whose final fact went out: a redelivery of one is not re-run


def group_id(settings: Settings) -> str:
    """The pool's consumer group. It carries the topic prefix: installations (and tests) sharing a cluster
    must not share groups either."""
    return Topics(settings.topic_prefix).worker_group(settings.worker_pool)


class WorkerService:
    def __init__(self, settings: Settings, ports_factory: PortsFactory, *,
                 options: WorkerOptions | None = None, metrics_registry: Any = None) -> None:
        """`metrics_registry`: where the counters go when a host process serves them (`noetl server
        --kafka`); by default the registry of the worker's own /metrics."""
        self.settings = settings
        self.options = options or WorkerOptions()
        self.topics = settings.topics
        self.topic = self.topics.commands(settings.worker_pool)
        self.group = group_id(settings)
        self.ports = ports_factory(self.emit)
        self.concurrency = settings.worker_concurrency
        self.producer: Any = None
        self.consumer: Any = None
        revoke_wait = self.options.revoke_wait
        if revoke_wait is None:
            revoke_wait = settings.kafka_session_timeout_ms / 3000
        self.offsets = Offsets(revoke_wait)
        self._inflight: set[asyncio.Task[Any]] = set()
        self._running: dict[str, asyncio.Task[Any]] = {}       # command_id -> its task
        self._reported: set[str] = set()                         # command ids whose final fact went out
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._slot = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._stopping = False
        self._abandon = False          # grace is over: stop retrying sends
        self._tasks: list[asyncio.Task[Any]] = []
        self.http_port: int | None = None
        self.app, registry = ops_app(self.not_ready, lambda: len(self._inflight), self.concurrency)
        self._http = OpsServer(self.app)
        self.metrics = WorkerMetrics(registry if metrics_registry is None else metrics_registry)

    # ------------------------------------------------------------------------------------------ state
    @property
    def tasks(self) -> tuple[asyncio.Task[Any], ...]:
        """The fetch and commit loops once started: a host process watches them (one ending is fatal)."""
        return tuple(self._tasks)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def not_ready(self) -> str | None:
        if self._stopping:
            return "stopping"
        if not self.offsets.joined:
            return f"not yet in consumer group {self.group}"
        return None

    # ------------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        s = self.settings
        if self.options.create_topics:
            try:
                await kafka_io.ensure_topics(s, self.topics, [s.worker_pool], partitions=s.topic_partitions)
            except KafkaError as exc:   # no rights to create topics: they must exist already
                log.warning("could not ensure topics: %r", exc)
        self.producer = kafka_io.make_producer(s)
        await self.producer.start()
        self.consumer = self.offsets.consumer = kafka_io.make_consumer(s, [], self.group)
        self.consumer.subscribe([self.topic], listener=self.offsets.listener())
        await self.consumer.start()
        if self.options.serve_http:
            port = self.options.http_port if self.options.http_port is not None else s.http_port
            self.http_port = await self._http.start(s.http_host, port)
        self._tasks = [asyncio.create_task(self._fetch_loop(), name="worker-fetch"),
                       asyncio.create_task(self.offsets.commit_loop(self.options.commit_interval),
                                           name="worker-commit")]
        log.info("worker %s serving %s in group %s (concurrency %d)", self.ports.worker_id, self.topic,
                 self.group, self.concurrency)

    def request_stop(self) -> None:
        if self._stop_requested.is_set():
            self._abandon = True       # a second signal: do not wait out the grace
            for task in list(self._inflight):
                task.cancel()
        self._stop_requested.set()

    async def run(self) -> None:
        """start(); serve until SIGTERM/SIGINT (or a loop of the worker fails); stop()."""
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
                installed.append(sig)
        died: BaseException | None = None
        try:
            await self.start()
            stop = asyncio.ensure_future(self._stop_requested.wait())
            done, _ = await asyncio.wait([stop, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            for task in done:
                if task is not stop and not task.cancelled() and task.exception() is not None:
                    died = task.exception()
                    log.error("%s failed: %r", task.get_name(), died, exc_info=died)
        finally:
            await self.stop()
            for sig in installed:
                loop.remove_signal_handler(sig)
        if died is not None:
            raise died

    async def stop(self) -> None:
        """Graceful: no new commands, in-flight ones get the grace, then commit and close."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_requested.set()
        fetch, commit = self._tasks or (None, None)
        if fetch is not None:
            await asyncio.gather(fetch, return_exceptions=True)
        if self._inflight:
            log.info("stopping: waiting up to %gs for %d command(s)", self.options.shutdown_grace, len(self._inflight))
            _, late = await asyncio.wait(set(self._inflight), timeout=self.options.shutdown_grace)
            if late:
                log.warning("stopping: %d command(s) did not finish within the grace; they will be redelivered",
                            len(late))
                self._abandon = True
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        if commit is not None:
            commit.cancel()
            await asyncio.gather(commit, return_exceptions=True)
        if self.consumer is not None:
            await self.offsets.commit()
            await self.consumer.stop()      # leaves the group: the partitions move on at once
        if self.producer is not None:
            await self.producer.stop()      # flushes whatever is still queued (heartbeats, announcements)
        await self._http.stop()
        log.info("worker %s stopped", self.ports.worker_id)

    # ------------------------------------------------------------------------------------------ emit
    async def emit(self, message: BaseModel) -> None:
        """The WorkerPorts.emit of this worker: route, encode, and wait for Kafka's acknowledgement."""
        topic = self.topics.requests if isinstance(message, StartExecution) else self.topics.results
        value, key = encode(message), message.execution_id.encode()   # type: ignore[attr-defined]
        if isinstance(message, (*_FINAL, StartExecution)):
            await self._send_until_sent(topic, value, key)
        else:   # announcements and heartbeats: one try, the lease tolerates a lost one
            await self.producer.send_and_wait(topic, value, key=key)
        if isinstance(message, _FINAL):
            self._reported.add(message.command_id)
            {ActionCompleted: self.metrics.completed, ActionFailed: self.metrics.failed,
             ChildStarted: self.metrics.children}[type(message)].inc()

    async def _send_until_sent(self, topic: str, value: bytes, key: bytes) -> None:
        delay = 0.2
        while True:
            try:
                await self.producer.send_and_wait(topic, value, key=key)
                return
            except KafkaError as exc:
                if not (exc.retriable or isinstance(exc, KafkaTimeoutError)) or self._abandon:
                    raise
                log.warning("send to %s failed (%r); retrying in %.1fs", topic, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    # ------------------------------------------------------------------------------------------ fetching
    async def _fetch_loop(self) -> None:
        paused = False
        while not self._stopping:
            if len(self._inflight) >= self.concurrency:
                self._slot.clear()
                try:
                    async with asyncio.timeout(1.0):
                        await self._slot.wait()
                except TimeoutError:
                    # Still full. Poll anyway, every partition paused (nothing is fetched or lost): a consumer
                    # that does not poll for max_poll_interval_ms is put out of its group, and long commands
                    # may hold every slot for that long.
                    self.consumer.pause(*self.consumer.assignment())
                    paused = True
                    self._take_all(await self.consumer.getmany(timeout_ms=0))   # partitions assigned since
                continue
            if paused:
                self.consumer.resume(*self.consumer.paused())
                paused = False
            free = self.concurrency - len(self._inflight)
            batches = await self.consumer.getmany(timeout_ms=self.options.poll_timeout_ms, max_records=free)
            if self._stopping:
                break        # not taken: never committed, so the next owner gets them
            self._take_all(batches)

    def _take_all(self, batches: Mapping[TopicPartition, list[ConsumerRecord]]) -> None:
        for records in batches.values():
            for record in records:
                self._take(record)

    def _take(self, record: ConsumerRecord) -> None:
        tp = TopicPartition(record.topic, record.partition)
        part = self.offsets.part(tp)
        if part is None:     # revoked since the fetch: the new owner reads it from the committed offset
            return
        part.take(record.offset)
        first_run: str | None = None
        try:
            if record.value is None:
                raise DecodeError("empty record: a command needs a value")
            cmd = decode_command(record.value)
        except DecodeError as exc:
            work = self._dead_letter(record, str(exc))
        else:
            running = self._running.get(cmd.command_id)
            if running is not None or cmd.command_id in self._finished:
                self.metrics.duplicates.inc()   # delivered again (a rebalance): the first run reports
                work = self._same_as(running)
            else:
                first_run = cmd.command_id
                work = self._run(cmd)
        task = asyncio.create_task(work, name=f"record-{record.partition}-{record.offset}")
        if first_run is not None:
            self._running[first_run] = task
        self._inflight.add(task)
        part.tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, part, record.offset))

    def _done(self, task: asyncio.Task[Any], part: PartitionOffsets, offset: int) -> None:
        self._inflight.discard(task)
        part.tasks.discard(task)
        self._slot.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("record %s failed: %r", task.get_name(), task.exception(), exc_info=task.exception())
        if task.cancelled() or task.exception() is not None or not task.result():
            return           # not finished: the offset stays uncommitted, so the record is delivered again
        self.offsets.finished(part, offset)

    async def _run(self, cmd: Command) -> bool:
        self.metrics.started.inc()
        try:
            await execute(cmd, self.ports)
        except Exception:    # execute never raises; if it ever does, leave the offset for a redelivery
            log.exception("command %s raised", cmd.command_id)
            return False
        finally:
            if self._running.get(cmd.command_id) is asyncio.current_task():
                del self._running[cmd.command_id]
        if cmd.command_id not in self._reported:
            log.error("command %s ended without a final fact reaching Kafka; its offset stays uncommitted",
                      cmd.command_id)
            return False
        self._reported.discard(cmd.command_id)
        self._finished[cmd.command_id] = None
        if len(self._finished) > _REMEMBER_FINISHED:
            self._finished.popitem(last=False)
        return True

    @staticmethod
    async def _same_as(first: asyncio.Task[Any] | None) -> bool:
        if first is None:
            return True      # finished (and reported) already
        return bool(await asyncio.shield(first))

    async def _dead_letter(self, record: ConsumerRecord, reason: str) -> bool:
        log.error("dead letter from %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
        await kafka_io.send_dead_letter(self.producer, self.topics, record.key, record.value, reason,
                                        record.topic, source_partition=record.partition,
                                        source_offset=record.offset)
        self.metrics.dead_letters.inc()
        return True
