"""The Kafka worker (noetl_worker.service) against a real Kafka protocol broker (Tansu unless told otherwise),
and `python -m noetl_worker` as a process (Postgres for its credentials and catalog when available).

Commands are produced to the test's own `noetl.commands.<pool>`; what the worker reports is read back from
`noetl.results`, `noetl.requests` and `noetl.dlq` by a tap with manual partition assignment (no group join
to wait for). Committed offsets are read with OffsetFetch, without joining the worker's group. Every wait
polls with a deadline.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

pytest.importorskip("aiokafka", reason="the [kafka] extra is not installed")

from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: E402
from cryptography.fernet import Fernet  # noqa: E402

from noetl_common.codec import decode_inbound, encode  # noqa: E402
from noetl_common.messages import (  # noqa: E402
    ActionCompleted, ActionFailed, ActionHeartbeat, ActionSpec, ActionStarted, ChildStarted, Command, DeadLetter,
    StartExecution,
)
from noetl_common.ports import CatalogEntry  # noqa: E402
from noetl_common.topics import Topics  # noqa: E402
from noetl_runtime import kafka_io  # noqa: E402
from noetl_worker.__main__ import NoCatalog  # noqa: E402
from noetl_worker.ports import WorkerPorts  # noqa: E402
from noetl_worker.python_pool import PythonPool  # noqa: E402
from noetl_worker.service import WorkerOptions, WorkerService, group_id  # noqa: E402
from support import free_port  # noqa: E402

pytestmark = pytest.mark.kafka

DEADLINE = 20.0
PARTITIONS = 3
T0 = 1_700_000_000.0
SECRET = "tok-7Hq-never-on-a-topic"


# ------------------------------------------------------------------------------------------------ helpers
def command(execution_id: str, code: str | None = None, *, step: str = "step1", attempt: int = 1,
            data: dict | None = None, lease_seconds: float = 30.0, type: str = "python",
            config: dict | None = None, deferred: list[str] | None = None) -> Command:
    """One attempt of one step, as the fold sends it (cf. tests/unit/test_worker_support.command)."""
    return Command(
        command_id=f"{execution_id}:{step}:1:{attempt}", execution_id=execution_id, step=step, visit=1,
        attempt=attempt, time=T0, lease_seconds=lease_seconds,
        action=ActionSpec(type=type, data=data or {}, config=config if config is not None else {"code": code},
                          deferred=deferred or [], context={"execution_id": execution_id}))


def sleeper(seconds: float) -> str:
    return f"import time\ndef main():\n    t0 = time.time()\n    time.sleep({seconds})\n    return [t0, time.time()]\n"


async def wait_for(check: Callable[[], Any], what: str, deadline: float = DEADLINE) -> Any:
    end = time.monotonic() + deadline
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < end, f"not within {deadline}s: {what}"
        await asyncio.sleep(0.02)


class Tap:
    """Every record of some topics from offset 0, collected in the background."""

    def __init__(self, bootstrap: str, names: list[str]) -> None:
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                         auto_offset_reset="earliest")
        self.consumer.assign([TopicPartition(n, p) for n in names for p in range(PARTITIONS)])
        self.records: list[Any] = []
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.consumer.start()
        self.task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        while True:
            for records in (await self.consumer.getmany(timeout_ms=100)).values():
                self.records.extend(records)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.consumer.stop()

    def on(self, topic: str) -> list[Any]:
        if topic.endswith("noetl.dlq"):
            return [DeadLetter.model_validate_json(r.value) for r in self.records if r.topic == topic]
        return [decode_inbound(r.value) for r in self.records if r.topic == topic]

    def about(self, topic: str, command_id: str) -> list[Any]:
        return [m for m in self.on(topic) if getattr(m, "command_id", None) == command_id]

    def final(self, topic: str, command_id: str) -> Any:
        return next((m for m in self.about(topic, command_id) if isinstance(m, (ActionCompleted, ActionFailed))),
                    None)

    def raw(self) -> bytes:
        return b"\n".join(r.value or b"" for r in self.records)


class Kafka:
    """The test's topics, a producer of commands, a tap on what workers report, committed offsets."""

    def __init__(self, settings: Any, topics: Topics) -> None:
        self.settings, self.topics = settings, topics
        self.commands = topics.commands(settings.worker_pool)
        self.producer = kafka_io.make_producer(settings)
        self.tap = Tap(settings.kafka_bootstrap, [topics.results, topics.requests, topics.dlq])
        self.offsets = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=group_id(settings),
                                        enable_auto_commit=False)

    async def start(self) -> None:
        await kafka_io.ensure_topics(self.settings, self.topics, [self.settings.worker_pool], partitions=PARTITIONS)
        await self.producer.start()
        await self.tap.start()
        await self.offsets.start()

    async def stop(self) -> None:
        await self.offsets.stop()
        await self.tap.stop()
        await self.producer.stop()

    async def send(self, cmd: Command | bytes, key: str | None = None) -> tuple[int, int]:
        value = cmd if isinstance(cmd, bytes) else encode(cmd)
        key = key if key is not None else cmd.execution_id  # type: ignore[union-attr]
        meta = await self.producer.send_and_wait(self.commands, value, key=key.encode())
        return meta.partition, meta.offset

    async def committed(self, partition: int) -> int | None:
        return await self.offsets.committed(TopicPartition(self.commands, partition))

    async def wait_committed(self, partition: int, offset: int) -> None:
        end = time.monotonic() + DEADLINE
        while (got := await self.committed(partition)) != offset:
            assert time.monotonic() < end, f"partition {partition}: committed {got}, expected {offset}"
            await asyncio.sleep(0.05)


@pytest.fixture
def settings(kafka_settings: Any) -> Any:
    return kafka_settings.model_copy(update={"worker_pool": "p1", "worker_concurrency": 8})


@pytest.fixture
async def kafka(settings: Any, topics: Topics) -> AsyncIterator[Kafka]:
    k = Kafka(settings, topics)
    await k.start()
    yield k
    await k.stop()


@pytest.fixture
async def worker(settings: Any) -> AsyncIterator[Callable[..., Any]]:
    """make(processes, catalog=..., env=..., **settings) -> a started in-process WorkerService."""
    made: list[tuple[WorkerService, PythonPool]] = []

    async def make(processes: int = 2, *, catalog: Any = None, env: dict | None = None,
                   options: WorkerOptions | None = None, **overrides: Any) -> WorkerService:
        pool = PythonPool(processes)
        service = WorkerService(
            settings.model_copy(update=overrides),
            lambda emit: WorkerPorts(emit=emit, python_pool=pool, catalog=catalog, worker_id="w-test",
                                     env=env or {}),
            options=options or WorkerOptions(http_port=0, create_topics=False, commit_interval=0.05))
        made.append((service, pool))
        await service.start()
        return service

    yield make
    for service, pool in made:
        await service.stop()
        pool.close()


async def http_get(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(_get, port, path)   # the in-process worker serves on this event loop


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# ------------------------------------------------------------------------------------------------ tests
async def test_commands_run_and_facts_reach_results(kafka: Kafka, worker: Any, topics: Topics) -> None:
    class Catalog(NoCatalog):
        async def get(self, path: str, version: int | None = None) -> CatalogEntry | None:
            doc = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "kid", "path": path}}
            return CatalogEntry(path=path, version=3, content="...", document=doc, created_at=T0)

    service = await worker(catalog=Catalog(), env={"NOETL_SECRET_API": SECRET})
    quick = command("ex-quick", "def main(n, who):\n    return {'square': n * n, 'who': who}\n",
                    data={"n": 7, "who": "é"})
    broken = command("ex-broken", "def main():\n    raise RuntimeError('boom')\n", attempt=2)
    slow = command("ex-slow", sleeper(0.7), lease_seconds=0.6)
    secret = command("ex-secret", "def main(token):\n    return 'got ' + token\n", data={"token": "{{ secret.API }}"},
                     deferred=["data.token"])
    child = command("ex-parent", type="playbook", config={"path": "tests/kid"}, data={"x": 1})
    last: dict[int, int] = {}
    for cmd in (quick, broken, slow, secret, child):
        partition, offset = await kafka.send(cmd)
        last[partition] = max(offset, last.get(partition, -1))

    tap, results = kafka.tap, topics.results
    done = await wait_for(lambda: tap.final(results, quick.command_id), "quick completion")
    assert isinstance(done, ActionCompleted) and done.execution_id == "ex-quick"
    assert done.result == {"square": 49, "who": "é"}
    assert done.started is not None and done.started <= done.time   # a quick attempt reports once
    assert tap.about(results, quick.command_id) == [done]

    failed = await wait_for(lambda: tap.final(results, broken.command_id), "failure")
    assert isinstance(failed, ActionFailed) and failed.command_id.endswith(":2") and "boom" in failed.error

    slow_done = await wait_for(lambda: tap.final(results, slow.command_id), "slow completion")
    kinds = [type(m) for m in tap.about(results, slow.command_id)]
    assert kinds[0] is ActionStarted and kinds[-1] is ActionCompleted and ActionHeartbeat in kinds
    assert tap.about(results, slow.command_id)[0].worker_id == "w-test" and slow_done.started is None

    hidden = await wait_for(lambda: tap.final(results, secret.command_id), "secret step")
    assert hidden.result == "got ***"

    started = await wait_for(lambda: [m for m in tap.on(topics.requests) if isinstance(m, StartExecution)],
                             "child start on noetl.requests")
    assert started[0].parent_command_id == child.command_id and started[0].version == 3
    assert await wait_for(lambda: [m for m in tap.about(results, child.command_id) if isinstance(m, ChildStarted)],
                          "ChildStarted on noetl.results")
    for record in tap.records:            # facts are keyed by the execution id (the fold's partitioning)
        assert record.key == decode_inbound(record.value).execution_id.encode()
    assert SECRET.encode() not in tap.raw()

    # Everything finished, so every partition's offset is committed past its last command.
    for partition, offset in last.items():
        await kafka.wait_committed(partition, offset + 1)

    status, body = await http_get(service.http_port, "/ready")
    assert status == 200, body
    assert (await http_get(service.http_port, "/health"))[0] == 200
    _, metrics = await http_get(service.http_port, "/metrics")
    assert "noetl_worker_commands_started_total 5.0" in metrics
    assert "noetl_worker_commands_completed_total 3.0" in metrics
    assert "noetl_worker_commands_failed_total 1.0" in metrics
    assert "noetl_worker_children_started_total 1.0" in metrics


async def test_without_a_catalog_a_child_playbook_fails_clearly(kafka: Kafka, worker: Any, topics: Topics) -> None:
    await worker(catalog=NoCatalog())
    child = command("ex-orphan", type="playbook", config={"path": "tests/kid"})
    await kafka.send(child)
    failed = await wait_for(lambda: kafka.tap.final(topics.results, child.command_id), "failure")
    assert isinstance(failed, ActionFailed) and "NOETL_DATABASE_URL is not set" in failed.error


async def test_commands_overlap_up_to_the_concurrency(kafka: Kafka, worker: Any, topics: Topics) -> None:
    await worker(processes=3, worker_concurrency=3)
    # 1.2 s each: the worker stays full for over a second, so it also polls with its partitions paused.
    cmds = [command(f"ex-par-{i}", sleeper(1.2)) for i in range(6)]
    began = time.monotonic()
    for cmd in cmds:
        await kafka.send(cmd)
    finals = await wait_for(lambda: all(kafka.tap.final(topics.results, c.command_id) for c in cmds) and
                            [kafka.tap.final(topics.results, c.command_id) for c in cmds], "all six done")
    elapsed = time.monotonic() - began
    spans = [f.result for f in finals]
    assert all(isinstance(f, ActionCompleted) for f in finals)
    overlap = max(sum(1 for s in spans if s[0] <= t < s[1]) for t, _ in spans)
    assert 2 <= overlap <= 3, spans        # they run together, but never more than NOETL_WORKER_CONCURRENCY
    assert elapsed < 6 * 1.2                # clearly not one after the other (even with the group join)


async def test_a_garbage_record_goes_to_the_dlq_and_the_partition_flows(kafka: Kafka, worker: Any,
                                                                           topics: Topics) -> None:
    service = await worker()
    key = "ex-dlq"
    bad_partition, bad_offset = await kafka.send(b'{"command_id": "half a command"', key=key)
    good = command(key, "def main():\n    return 'after the garbage'\n")
    partition, offset = await kafka.send(good)
    assert partition == bad_partition and offset == bad_offset + 1

    done = await wait_for(lambda: kafka.tap.final(topics.results, good.command_id), "the next command")
    assert done.result == "after the garbage"
    (letter,) = await wait_for(lambda: kafka.tap.on(topics.dlq), "the dead letter")
    assert letter.source_topic == kafka.commands and letter.source_offset == bad_offset
    assert letter.original_key() == key.encode() and letter.original_value() == b'{"command_id": "half a command"'
    assert letter.reason.startswith(("invalid message", "undecodable message"))
    await kafka.wait_committed(partition, offset + 1)    # committed past both
    assert "noetl_worker_dead_letters_total 1.0" in (await http_get(service.http_port, "/metrics"))[1]


async def test_a_redelivered_command_is_not_run_twice(kafka: Kafka, worker: Any, topics: Topics) -> None:
    # What a rebalance does: the same record again, while the first copy runs and after it finished.
    service = await worker()
    slow = command("ex-dup", sleeper(0.6))
    await kafka.send(slow)
    await kafka.send(slow)
    await wait_for(lambda: kafka.tap.final(topics.results, slow.command_id), "completion")
    partition, offset = await kafka.send(slow)
    await kafka.wait_committed(partition, offset + 1)           # every copy counts as finished ...
    kinds = [type(m) for m in kafka.tap.about(topics.results, slow.command_id)]
    assert kinds == [ActionStarted, ActionCompleted]            # ... but it ran once
    assert "noetl_worker_duplicates_total 2.0" in (await http_get(service.http_port, "/metrics"))[1]


async def test_graceful_stop_finishes_in_flight_work_and_commits(kafka: Kafka, worker: Any, topics: Topics) -> None:
    service = await worker(options=WorkerOptions(http_port=0, create_topics=False, shutdown_grace=2.5))
    short, long = command("ex-short", sleeper(1.0)), command("ex-long", sleeper(30))
    short_at = await kafka.send(short)
    long_at = await kafka.send(long)
    if long_at[0] == short_at[0]:     # same partition: let the long one live in another
        long = command("ex-long-2", sleeper(30))
        long_at = await kafka.send(long)
    assert long_at[0] != short_at[0]
    for cmd in (short, long):
        await wait_for(lambda c=cmd: kafka.tap.about(topics.results, c.command_id), f"{cmd.command_id} started")

    stopped = time.monotonic()
    service.request_stop()
    await service.stop()
    took = time.monotonic() - stopped
    done = kafka.tap.final(topics.results, short.command_id)
    assert isinstance(done, ActionCompleted) and done.result[1] - done.result[0] >= 1.0   # it was let finish
    assert kafka.tap.final(topics.results, long.command_id) is None                      # cancelled after the grace
    assert 0.5 < took < 2.5 + 2.0
    assert await kafka.committed(short_at[0]) == short_at[1] + 1
    assert (await kafka.committed(long_at[0]) or 0) <= long_at[1]   # not committed: the next owner re-runs it


# ------------------------------------------------------------------------------------- worker processes

class Proc:
    """`python -m noetl_worker` in a session of its own (its python pool processes belong to it)."""

    def __init__(self, settings: Any, **env: str) -> None:
        self.port = free_port()
        full = {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}
        full.update({
            "NOETL_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "NOETL_TOPIC_PREFIX": settings.topic_prefix,
            "NOETL_KAFKA_SESSION_TIMEOUT_MS": str(settings.kafka_session_timeout_ms),
            "NOETL_WORKER_POOL": settings.worker_pool, "NOETL_HTTP_PORT": str(self.port),
            "NOETL_WORKER_PYTHON_PROCESSES": "1", "NOETL_WORKER_CREATE_TOPICS": "false", "NOETL_LOG_LEVEL": "INFO",
        })
        full.update(env)
        self.stderr = tempfile.TemporaryFile()   # not a pipe: a chatty worker must never block on it
        self.popen = subprocess.Popen([sys.executable, "-m", "noetl_worker"], env=full, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=self.stderr, start_new_session=True)
        self.worker_id = f"{socket.gethostname()}-{self.popen.pid}"

    async def ready(self) -> None:
        def check() -> bool:
            assert self.popen.poll() is None, f"worker exited: {self.log()[-3000:]}"
            try:
                return _get(self.port, "/ready")[0] == 200
            except OSError:
                return False
        await wait_for(check, "worker /ready", deadline=30)

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    async def wait(self, deadline: float) -> int:
        (code,) = await wait_for(lambda: self.popen.poll() is not None and (self.popen.returncode,),
                                 "worker exit", deadline)
        return code

    def reap(self) -> None:
        """Whatever is left of the process group (e.g. python pool children of a killed worker)."""
        with_suppressed = (ProcessLookupError, PermissionError)
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except with_suppressed:
            pass
        self.popen.wait()
        self.stderr.close()


@pytest.fixture
def procs() -> Any:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.reap()


async def test_sigkill_mid_command_redelivers_it_to_the_next_worker(kafka: Kafka, settings: Any, topics: Topics,
                                                                   procs: list[Proc]) -> None:
    first = Proc(settings)
    procs.append(first)
    eid = f"ex-kill-{uuid.uuid4().hex[:6]}"
    quick, slow = command(eid, "def main():\n    return 'quick'\n"), command(eid, sleeper(1.5), step="slow")
    partition, quick_offset = await kafka.send(quick)
    _, slow_offset = await kafka.send(slow)
    await first.ready()
    results = topics.results
    await wait_for(lambda: kafka.tap.final(results, quick.command_id), "quick done by the first worker")
    start = await wait_for(lambda: kafka.tap.about(results, slow.command_id), "slow started")
    assert start[0].worker_id == first.worker_id
    await kafka.wait_committed(partition, quick_offset + 1)    # up to the lowest unfinished record only

    first.popen.send_signal(signal.SIGKILL)                    # mid-command: nothing more is committed
    assert await first.wait(5) == -signal.SIGKILL
    assert kafka.tap.final(results, slow.command_id) is None
    assert await kafka.committed(partition) == slow_offset

    second = Proc(settings)
    procs.append(second)
    done = await wait_for(lambda: kafka.tap.final(results, slow.command_id), "slow redone by the second worker",
                          deadline=35)
    assert isinstance(done, ActionCompleted) and done.command_id == slow.command_id
    starts = [m for m in kafka.tap.about(results, slow.command_id) if isinstance(m, ActionStarted)]
    assert [m.worker_id for m in starts] == [first.worker_id, second.worker_id]
    assert len(kafka.tap.about(results, quick.command_id)) == 1    # committed work is not redone
    await kafka.wait_committed(partition, slow_offset + 1)

    second.popen.send_signal(signal.SIGTERM)
    assert await second.wait(10) == 0, second.log()[-3000:]


async def test_worker_process_with_postgres_credentials_and_catalog(kafka: Kafka, settings: Any, topics: Topics,
                                                                   procs: list[Proc], pg_dsn: str) -> None:
    asyncpg = pytest.importorskip("asyncpg")
    from noetl_runtime.postgres_store import PostgresCatalog, PostgresCredentials, ensure_schema

    schema = f"noetl_{uuid.uuid4().hex[:12]}"
    key = Fernet.generate_key().decode()
    db = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        await ensure_schema(db, schema)
        await PostgresCredentials(db, schema, key=key).put("api", "bearer", {"token": SECRET})
        kid = await PostgresCatalog(db, schema).register("kid: yes", {"apiVersion": "noetl.io/v1", "kind": "Playbook",
                                                                      "metadata": {"name": "kid"}}, "tests/kid")
        worker = Proc(settings, NOETL_DATABASE_URL=pg_dsn, NOETL_DATABASE_SCHEMA=schema, NOETL_SECRET_KEY=key)
        procs.append(worker)
        use = command("ex-pg", "def main(token):\n    return 'used ' + token\n", data={"token": "{{ secret.api }}"},
                      deferred=["data.token"])
        child = command("ex-pg-parent", type="playbook", config={"path": "tests/kid"})
        await kafka.send(use)
        await kafka.send(child)
        await worker.ready()
        assert (await http_get(worker.port, "/health"))[0] == 200

        done = await wait_for(lambda: kafka.tap.final(topics.results, use.command_id), "secret step")
        assert done.result == "used ***"
        starts = await wait_for(lambda: [m for m in kafka.tap.on(topics.requests) if isinstance(m, StartExecution)],
                                "child start")
        assert starts[0].path == "tests/kid" and starts[0].version == kid.version
        assert SECRET.encode() not in kafka.tap.raw()

        worker.popen.send_signal(signal.SIGTERM)
        assert await worker.wait(10) == 0, worker.log()[-3000:]
        log = worker.log()
        assert '"message": "worker' in log and SECRET not in log
    finally:
        await db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await db.close()
