"""The Kafka worker: a consumer group per pool on `noetl.commands.<pool>`, each command run by `execute`.

    service = WorkerService(settings, ports_factory)   # ports_factory(emit) -> WorkerPorts
    await service.run()                                 # until SIGTERM/SIGINT; or start() ... stop()

Routing of what `execute` emits: StartExecution (a child playbook) -> noetl.requests, every fact
(ActionStarted/Completed/Failed, heartbeats, ChildStarted) -> noetl.results; both keyed by execution_id.
A record that does not decode as a Command goes to noetl.dlq with the reason; its partition keeps flowing.

Offsets (architecture invariant 6, at-least-once). Commands run concurrently, so they finish out of order.
Per partition the worker keeps the offsets it took, in order, and commits only up to the lowest one that
has not finished, where "finished" means its final fact (ActionCompleted, ActionFailed or ChildStarted)
was acknowledged by Kafka (acks=all), or its dead letter was. A crash therefore loses nothing: whatever
was not finished is delivered again to the next owner of the partition, which runs the same attempt
(same command_id); the fold keeps the first final fact and drops the rest as stale. A final fact that
cannot be sent is retried while the worker lives; if it never goes out, its offset stays uncommitted.

Shutdown (SIGTERM/SIGINT): stop fetching, give in-flight commands `shutdown_grace` seconds, cancel the
rest (uncommitted: redelivered elsewhere), commit, leave the group, flush the producer. A second signal
skips the grace.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError
from prometheus_client import Counter
from pydantic import BaseModel

from noetl_common.topics import Topics
from noetl_common.codec import DecodeError, decode_command, encode
from noetl_common.messages import ActionCompleted, ActionFailed, ChildStarted, Command, StartExecution
from noetl_common.ports import Emit
from noetl_runtime import kafka_io
from noetl_runtime.settings import Settings
from noetl_worker.execute import execute
from noetl_worker.ports import WorkerPorts

log = logging.getLogger("noetl.worker.service")

PortsFactory = Callable[[Emit], WorkerPorts]
_FINAL = (ActionCompleted, ActionFailed, ChildStarted)
_REMEMBER_FINISHED = 10_000   # command ids whose final fact went out: a redelivery of one is not re-run


def group_id(settings: Settings) -> str:
    """The pool's consumer group. It carries the topic prefix: installations (and tests) sharing a cluster
    must not share groups either."""
    return Topics(settings.topic_prefix).worker_group(settings.worker_pool)


@dataclass(frozen=True)
class WorkerOptions:
    """Worker knobs that are not (yet) in `Settings`; `from_env` reads them from NOETL_WORKER_*."""
    shutdown_grace: float = 30.0       # NOETL_WORKER_SHUTDOWN_GRACE: in-flight commands may finish within it
    commit_interval: float = 0.2       # at most one offset commit per this many seconds
    poll_timeout_ms: int = 100         # one fetch waits at most this long (bounds how fast stop() is noticed)
    revoke_wait: float | None = None   # a rebalance waits this long for revoked in-flight commands
                                       # (None: a third of the session timeout)
    serve_http: bool = True
    http_port: int | None = None       # None: settings.http_port; 0: any free port (tests)
    create_topics: bool = True         # create missing topics at start (kafka_io.ensure_topics)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerOptions:
        env = os.environ if env is None else env
        grace = float(env.get("NOETL_WORKER_SHUTDOWN_GRACE", cls.shutdown_grace))
        if grace < 0:
            raise ValueError("NOETL_WORKER_SHUTDOWN_GRACE must be >= 0")
        create = env.get("NOETL_WORKER_CREATE_TOPICS", "true").strip().lower() not in ("0", "false", "no")
        return cls(shutdown_grace=grace, create_topics=create)


class _Partition:
    """The offsets taken from one partition (in fetch order) and which of them have finished."""

    def __init__(self) -> None:
        self.taken: deque[list[Any]] = deque()   # [offset, finished]
        self.entries: dict[int, list[Any]] = {}
        self.commit_to: int | None = None        # the next offset to read after a restart
        self.committed: int | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    def take(self, offset: int) -> None:
        entry = [offset, False]
        self.taken.append(entry)
        self.entries[offset] = entry

    def finish(self, offset: int) -> bool:
        """Mark done; True when the committable position moved."""
        entry = self.entries.pop(offset, None)
        if entry is None:
            return False
        entry[1] = True
        moved = False
        while self.taken and self.taken[0][1]:
            self.commit_to = self.taken.popleft()[0] + 1
            moved = True
        return moved


class _Metrics:
    def __init__(self, registry: Any) -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, registry=registry)
        self.started = counter("noetl_worker_commands_started", "commands taken and started")
        self.completed = counter("noetl_worker_commands_completed", "ActionCompleted facts sent")
        self.failed = counter("noetl_worker_commands_failed", "ActionFailed facts sent")
        self.children = counter("noetl_worker_children_started", "child executions started (type: playbook)")
        self.dead_letters = counter("noetl_worker_dead_letters", "records that were not commands, sent to the DLQ")
        self.duplicates = counter("noetl_worker_duplicates", "redelivered commands not run again")


class WorkerService:
    def __init__(self, settings: Settings, ports_factory: PortsFactory, *,
                 options: WorkerOptions | None = None) -> None:
        self.settings = settings
        self.options = options or WorkerOptions()
        self.topics = settings.topics
        self.topic = self.topics.commands(settings.worker_pool)
        self.group = group_id(settings)
        self.ports = ports_factory(self.emit)
        self.concurrency = settings.worker_concurrency
        self.producer: Any = None
        self.consumer: Any = None
        self._parts: dict[TopicPartition, _Partition] = {}
        self._inflight: set[asyncio.Task[Any]] = set()
        self._running: dict[str, asyncio.Task[Any]] = {}       # command_id -> its task
        self._reported: set[str] = set()                         # command ids whose final fact went out
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._slot = asyncio.Event()
        self._dirty = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._stopping = False
        self._abandon = False          # grace is over: stop retrying sends
        self._joined = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._http: Any = None
        self._http_task: asyncio.Task[Any] | None = None
        self.http_port: int | None = None
        self.app, registry = self._build_app()
        self.metrics = _Metrics(registry)

    # ------------------------------------------------------------------------------------------ state
    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def not_ready(self) -> str | None:
        if self._stopping:
            return "stopping"
        if not self._joined:
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
        self.consumer = kafka_io.make_consumer(s, [], self.group)
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))
        await self.consumer.start()
        if self.options.serve_http:
            await self._start_http()
        self._tasks = [asyncio.create_task(self._fetch_loop(), name="worker-fetch"),
                       asyncio.create_task(self._commit_loop(), name="worker-commit")]
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
            await self._commit()
            await self.consumer.stop()      # leaves the group: the partitions move on at once
        if self.producer is not None:
            await self.producer.stop()      # flushes whatever is still queued (heartbeats, announcements)
        await self._stop_http()
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
        part = self._parts.get(tp)
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

    def _done(self, task: asyncio.Task[Any], part: _Partition, offset: int) -> None:
        self._inflight.discard(task)
        part.tasks.discard(task)
        self._slot.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("record %s failed: %r", task.get_name(), task.exception(), exc_info=task.exception())
        if task.cancelled() or task.exception() is not None or not task.result():
            return           # not finished: the offset stays uncommitted, so the record is delivered again
        if part.finish(offset):
            self._dirty.set()

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

    # ------------------------------------------------------------------------------------------ offsets
    async def _commit_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self._commit()
            await asyncio.sleep(self.options.commit_interval)   # pacing: many completions, one commit

    async def _commit(self, parts: Iterable[TopicPartition] | None = None) -> None:
        async with self._commit_lock:
            chosen = {tp: self._parts[tp] for tp in (parts if parts is not None else list(self._parts))
                      if tp in self._parts}
            offsets = {tp: p.commit_to for tp, p in chosen.items()
                       if p.commit_to is not None and p.commit_to != p.committed}
            if not offsets:
                return
            try:
                await self.consumer.commit(offsets)
            except KafkaError as exc:   # a rebalance took the partitions: their records come again
                log.warning("offset commit failed: %r", exc)
                return
            for tp, offset in offsets.items():
                chosen[tp].committed = offset

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        tasks = {t for tp in revoked if tp in self._parts for t in self._parts[tp].tasks}
        wait = self.options.revoke_wait
        if wait is None:
            wait = self.settings.kafka_session_timeout_ms / 3000
        if tasks and wait > 0:   # a short wait spares the next owner re-running commands about to finish
            await asyncio.wait(tasks, timeout=wait)
        await self._commit(revoked)
        for tp in revoked:
            self._parts.pop(tp, None)   # tasks still running report, but no longer commit

    def _assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self._parts.setdefault(tp, _Partition())
        self._joined = True
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))

    # ------------------------------------------------------------------------------------------ HTTP
    def _build_app(self) -> tuple[Any, Any]:
        from fastapi import FastAPI
        from noetl_runtime.http_ops import install_ops   # the ops endpoints every service shares

        app = FastAPI(title="noetl worker", version="1")
        registry = install_ops(app, service="worker", ready=self.not_ready, gauges={
            "noetl_worker_commands_in_flight": ("commands running now", lambda: float(len(self._inflight))),
            "noetl_worker_concurrency": ("commands this worker runs at once at most", lambda: float(self.concurrency)),
        })
        return app, registry

    async def _start_http(self) -> None:
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Any:   # the worker handles SIGTERM/SIGINT itself
                yield

        port = self.options.http_port if self.options.http_port is not None else self.settings.http_port
        config = uvicorn.Config(self.app, host=self.settings.http_host, port=port, log_config=None,
                                lifespan="off", access_log=False)
        self._http = _Server(config)
        serving = asyncio.create_task(self._http.serve(), name="worker-http")
        while not self._http.started:
            if serving.done():
                await serving
                raise RuntimeError(f"HTTP server did not start on {self.settings.http_host}:{port}")
            await asyncio.sleep(0.01)
        self._http_task = serving
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1]

    async def _stop_http(self) -> None:
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            await asyncio.gather(self._http_task, return_exceptions=True)
        self._http = self._http_task = None


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, service: WorkerService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.service._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.service._assigned(set(assigned))
