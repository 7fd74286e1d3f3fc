"""Leases measure workers, not the broker: two fault scenarios on real Kafka (Tansu unless told otherwise)
with `python -m noetl_broker` and `python -m noetl_worker` as separate processes, exactly as deployed.

- Broker outage longer than the lease: the broker is SIGKILLed while every execution's slow step runs, stays
  down for more than three leases while the workers finish and report, then restarts. With no
  infrastructure retries allowed (lease_retries=0), any lease fired before the facts that waited on
  noetl.results would fail its execution: none may fail.
- Workers killed every 3 s: two workers, each SIGKILLed (process group, as a node dies) and restarted in turn
  while executions whose step has no `retry:` run; the lost leases are absorbed by the automatic
  infrastructure retries: none may fail.

The step is an http call to a server in this test that holds each request open and counts it (the side
effect): duplicates are reported as a figure. Nothing needs Postgres.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

pytest.importorskip("aiokafka", reason="the [kafka] extra is not installed")
pytest.importorskip("faust", reason="the [kafka] extra is not installed")

import httpx  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402

from noetl_common.codec import decode_event, encode  # noqa: E402
from noetl_common.messages import TERMINAL_EVENTS, Event, StartExecution  # noqa: E402
from noetl_common.topics import Topics  # noqa: E402
from support import free_port  # noqa: E402

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 6
READY = 60.0             # a restarted consumer group on Tansu waits out the old member's session


class SlowServer:
    """Answers GET /slow?eid=… after `hold` seconds, counting every request per execution (the side effect)."""

    def __init__(self, hold: float) -> None:
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                eid = parse_qs(urlsplit(self.path).query).get("eid", ["?"])[0]
                with server.lock:
                    server.calls[eid] += 1
                time.sleep(hold)
                body = json.dumps({"eid": eid}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:   # the worker that asked was killed meanwhile
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/slow"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Role:
    """`python -m <module>` in its own process group (SIGKILL takes its python children too), log in a file."""

    def __init__(self, module: str, env: dict[str, str], name: str) -> None:
        self.module, self.name = module, name
        self.port = free_port()
        self.env = {**env, "NOETL_HTTP_PORT": str(self.port)}
        self.cwd = tempfile.mkdtemp(prefix=f"noetl-{name}.")     # faust writes `<app id>-data` there
        self.log = Path(self.cwd) / "log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", self.module], env=self.env, cwd=self.cwd,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.starts += 1

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    async def ready(self, deadline: float = READY) -> None:
        end = time.monotonic() + deadline
        async with httpx.AsyncClient(timeout=1.0) as client:
            while True:
                assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited:\n{self.tail()}"
                assert time.monotonic() < end, f"{self.name} not ready within {deadline}s:\n{self.tail()}"
                try:
                    if (await client.get(f"http://127.0.0.1:{self.port}/ready")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.kill()
        if os.environ.get("NOETL_TEST_KEEP_LOGS"):
            print(f"{self.name} log: {self.log}")
        else:
            shutil.rmtree(self.cwd, ignore_errors=True)


class Observer:
    """Produces the starts and reads noetl.events from the earliest offset (manual assignment, no group)."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self.bootstrap, self.topics = bootstrap, topics
        self.events: dict[str, list[Event]] = {}

    async def __aenter__(self) -> Observer:
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=False)
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, fetch_max_wait_ms=10,
                                         enable_auto_commit=False, auto_offset_reset="earliest")
        await self.producer.start()
        await self.consumer.start()
        self.consumer.assign([TopicPartition(self.topics.events, p) for p in range(PARTITIONS)])
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.consumer.stop()
        await self.producer.stop()

    async def start(self, start: StartExecution) -> None:
        await self.producer.send_and_wait(self.topics.requests, encode(start), key=start.execution_id.encode())

    async def pump(self) -> None:
        for records in (await self.consumer.getmany(timeout_ms=100)).values():
            for record in records:
                event = decode_event(record.value)
                self.events.setdefault(event.execution_id, []).append(event)

    def count(self, ids: list[str], kind: str, step: str | None = None) -> int:
        return sum(1 for eid in ids for e in self.events.get(eid, [])
                   if e.event_type == kind and (step is None or e.node_name == step))

    def finished(self, ids: list[str]) -> int:
        return sum(1 for eid in ids if any(e.event_type in TERMINAL_EVENTS for e in self.events.get(eid, [])))

    async def until(self, check: Any, what: str, deadline: float) -> None:
        end = time.monotonic() + deadline
        while not check():
            assert time.monotonic() < end, f"no {what} within {deadline}s"
            await self.pump()


def playbook(url: str) -> dict[str, Any]:
    """start → call (http, no `retry:`) → end: the call's request is the side effect."""
    return {"apiVersion": "noetl.io/v1", "kind": "Playbook",
            "metadata": {"name": "lease_fault", "path": "tests/lease_fault"},
            "workflow": [{"step": "start", "next": [{"step": "call"}]},
                         {"step": "call", "type": "http", "method": "GET", "endpoint": url,
                          "data": {"eid": "{{ execution_id }}"}, "next": [{"step": "end"}]},
                         {"step": "end"}]}


def env_for(bootstrap: str, topics: Topics) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOETL_", "KAFKA_"))}
    env.update(NOETL_KAFKA_BOOTSTRAP=bootstrap, NOETL_TOPIC_PREFIX=topics.prefix,
               NOETL_TOPIC_PARTITIONS=str(PARTITIONS), NOETL_KAFKA_SESSION_TIMEOUT_MS="3000",
               NOETL_BROKER_SESSION_TIMEOUT="3", NOETL_BROKER_COMMIT_INTERVAL="0.5",
               NOETL_WORKER_PYTHON_PROCESSES="1", NOETL_WORKER_SHUTDOWN_GRACE="1", NOETL_LOG_LEVEL="INFO",
               PYTHONPATH=os.pathsep.join([str(ROOT / "services" / "broker"), os.environ.get("PYTHONPATH", "")]))
    return env


def outcome(observer: Observer, ids: list[str]) -> dict[str, Any]:
    status = Counter(next(e.event_type for e in observer.events[eid] if e.event_type in TERMINAL_EVENTS)
                     for eid in ids)
    infra = [e for eid in ids for e in observer.events[eid]
             if e.event_type == "action_retry" and (e.result or {}).get("kind") == "infrastructure"]
    return {"status": dict(status), "infra_retries": len(infra),
            "action_errors": observer.count(ids, "action_error"),
            "failures": [e.error for eid in ids for e in observer.events[eid] if e.event_type == "execution_failed"]}


# ------------------------------------------------------------------------------------ broker outage > lease
async def test_a_broker_outage_longer_than_the_lease_fails_no_execution(kafka_bootstrap: str) -> None:
    lease, executions, hold, outage = 2.0, 60, 5.0, 8.0
    topics = Topics(prefix=f"t.outage.{uuid.uuid4().hex[:8]}.")
    server = SlowServer(hold)
    env = env_for(kafka_bootstrap, topics)
    broker, worker = Role("noetl_broker", env, "broker"), Role("noetl_worker", env, "worker")
    try:
        broker.start()
        await broker.ready()
        worker.start()
        await worker.ready()
        async with Observer(kafka_bootstrap, topics) as observer:
            ids = [f"outage-{i}-{uuid.uuid4().hex[:6]}" for i in range(executions)]
            for eid in ids:   # no infrastructure retry: a lease fired before the waiting facts fails the run
                await observer.start(StartExecution(execution_id=eid, time=time.time(), playbook=playbook(server.url),
                                                    path="tests/lease_fault", lease_seconds=lease, lease_retries=0))
            # every attempt announced (the broker holds its lease) and its request is being held
            await observer.until(lambda: observer.count(ids, "action_started", "call") == executions
                                 and sum(server.calls.values()) == executions, "announced calls", 40)
            broker.kill()                                     # SIGKILL: no commit, no goodbye
            killed = time.monotonic()
            await asyncio.sleep(outage)                       # > 3 leases; the calls end and are reported
            assert observer.finished(ids) == 0 and sum(server.calls.values()) == executions
            broker.start()
            await broker.ready()
            back = time.monotonic()
            await observer.until(lambda: observer.finished(ids) == executions, "terminal events", 60)
            done = time.monotonic()
    finally:
        broker.close()
        worker.close()
        server.close()
    result = outcome(observer, ids)
    print(f"broker down {back - killed:.1f}s (lease {lease:g}s): {result}; all finished {done - back:.1f}s after "
          f"the broker was ready again; side effects per execution: {Counter(server.calls.values())}")
    assert result["status"] == {"execution_complete": executions}, result
    assert result["action_errors"] == 0 and result["infra_retries"] == 0, result
    assert all(server.calls[eid] == 1 for eid in ids), server.calls      # every call ran once


# --------------------------------------------------------------------------------- workers killed every 3 s
async def test_workers_killed_every_3s_fail_no_execution_whose_step_has_no_retry(kafka_bootstrap: str) -> None:
    lease, executions, every, hold, kill_every, kills_max = 1.0, 30, 0.4, 2.0, 3.0, 5
    topics = Topics(prefix=f"t.killed.{uuid.uuid4().hex[:8]}.")
    server = SlowServer(hold)
    env = env_for(kafka_bootstrap, topics)
    broker = Role("noetl_broker", env, "broker")
    workers = [Role("noetl_worker", env, f"worker{i}") for i in (1, 2)]
    kills = 0
    try:
        broker.start()
        await broker.ready()
        for worker in workers:
            worker.start()
        for worker in workers:
            await worker.ready()
        async with Observer(kafka_bootstrap, topics) as observer:
            ids = [f"killed-{i}-{uuid.uuid4().hex[:6]}" for i in range(executions)]

            async def submit() -> None:   # staggered, so both workers hold attempts at every kill
                for eid in ids:           # the defaults: 3 infrastructure retries after 1, 2, 4 s
                    await observer.start(StartExecution(execution_id=eid, time=time.time(), path="tests/lease_fault",
                                                        playbook=playbook(server.url), lease_seconds=lease))
                    await asyncio.sleep(every)
            submitting = asyncio.create_task(submit())
            await observer.until(lambda: sum(server.calls.values()) > 0, "a first call", 40)
            end = time.monotonic() + 90
            next_kill = time.monotonic() + 1
            while observer.finished(ids) < executions:
                assert time.monotonic() < end, f"{observer.finished(ids)} of {executions} finished"
                if time.monotonic() >= next_kill and kills < kills_max:   # one worker at a time, every 3 s
                    victim = workers[kills % 2]
                    victim.kill()
                    kills += 1
                    victim.start()                                        # back, as a supervisor restarts it
                    next_kill = time.monotonic() + kill_every
                await observer.pump()
            await submitting
    finally:
        broker.close()
        for worker in workers:
            worker.close()
        server.close()
    result = outcome(observer, ids)
    duplicates = sum(n - 1 for n in server.calls.values())
    print(f"{kills} worker kills: {result}; duplicate side effects: {duplicates} "
          f"(calls per execution: {Counter(server.calls[eid] for eid in ids)})")
    assert result["status"] == {"execution_complete": executions}, result
    assert result["action_errors"] == 0, result      # no attempt was failed by a lost lease
    assert all(server.calls[eid] >= 1 for eid in ids)
