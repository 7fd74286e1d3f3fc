"""The broker (services/broker) against a real Kafka protocol broker (Tansu unless told otherwise).

The broker runs as `python -m noetl_broker` in a subprocess, exactly as deployed; the test plays the
worker: it reads noetl.commands.default and answers on noetl.results. Every execution's event log is
compared with the pure simulator's (`noetl_common.simulate`) for the same script and the same message
times: the same advance() must give the same events, byte for byte.

Tansu rules (architecture §5): unique topics and groups per broker (own prefix), consumers read from the
earliest offset with manual assignment (no group join to wait for), nothing asserts on end offsets. Every
wait polls with a deadline.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiokafka", reason="the [kafka] extra is not installed")
pytest.importorskip("faust", reason="the [kafka] extra is not installed")

import httpx  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402

from noetl_common.codec import decode_command, decode_event, encode  # noqa: E402
from noetl_common.messages import (  # noqa: E402
    TERMINAL_EVENTS, ActionCompleted, ActionFailed, ActionStarted, ChildStarted, Command, DeadLetter, Event,
    StartExecution, TimerFired,
)
from noetl_common.simulate import Outcome, Simulation, sim_key  # noqa: E402
from noetl_common.state import ExecutionState  # noqa: E402
from noetl_common.topics import Topics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BROKER_SRC = ROOT / "services" / "broker"
if importlib.util.find_spec("noetl_broker") is None:   # until pyproject lists services/broker
    sys.path.insert(0, str(BROKER_SRC))

from noetl_common.batch import Record, fold_batch  # noqa: E402
from noetl_common.state_access import StateCache, TableStates  # noqa: E402

pytestmark = pytest.mark.kafka

PARTITIONS = 3
BROKER_TOKEN = secrets.token_urlsafe(32)   # the brokers' /metrics and /explain take it (docs/security.md)
READY_DEADLINE = 40.0     # a restarted group on Tansu waits out the old member's session
DEADLINE = 20.0
T0 = 1_700_000_000.0   # message times of the pure tests. Against the broker, messages carry the time of the test:
                       # its timer loop runs on the real clock, and a lease set at T0 + 30 s would be long due.


def playbook(name: str, a_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """start → a (python) → b (python) → end."""
    a = {"step": "a", "type": "python", "code": "def main():\n    return 1\n", "next": [{"step": "b"}]}
    a.update(a_extra or {})
    return {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": name, "path": f"tests/{name}"},
            "workflow": [{"step": "start", "next": [{"step": "a"}]}, a,
                         {"step": "b", "type": "python", "code": "def main():\n    return 2\n",
                          "next": [{"step": "end"}]},
                         {"step": "end"}]}


def ok(cmd: Command) -> Outcome:
    return Outcome(result={"step": cmd.step, "attempt": cmd.attempt})


def simulate(document: dict[str, Any], execution_id: str, worker: Callable[[Command], Outcome] = ok,
             now: float = T0, catalog: dict[str, Any] | None = None) -> tuple[StartExecution, Simulation]:
    """The expected run: the pure fold with a scripted worker answering at `now` (as the test will)."""
    sim = Simulation(worker, now=now, catalog=catalog or {})
    sim.start(document, execution_id=execution_id)
    start = sim.inbox[0]
    sim.run()
    return start, sim


def answer(cmd: Command, outcome: Outcome, now: float) -> list[Any]:
    """What the simulator's worker sends for a command, with the same fields (so the events match)."""
    started = ActionStarted(execution_id=cmd.execution_id, command_id=cmd.command_id, time=now, token=cmd.token)
    if outcome.ok:
        return [started, ActionCompleted(execution_id=cmd.execution_id, command_id=cmd.command_id, time=now,
                                         result=outcome.result, variables=outcome.variables, token=cmd.token)]
    return [started, ActionFailed(execution_id=cmd.execution_id, command_id=cmd.command_id, time=now,
                                  error=outcome.error, status_code=outcome.status_code, result=outcome.result,
                                  token=cmd.token)]


# ---------------------------------------------------------------------------------------------------------
# The pure part: the batch fold the broker runs (noetl_common.batch), with a dict for the table (no Kafka)
# ---------------------------------------------------------------------------------------------------------
def apply_batch(table: dict[str, bytes], records: list[Any], now: float, cache: StateCache | None = None,
                late_start_after: float | None = None) -> Any:
    """The broker's call: fold_batch over its table (here a dict) through its StateCache."""
    return fold_batch(TableStates(table, cache), records, now=now, late_start_after=late_start_after)


def test_apply_batch_folds_like_the_simulator_and_dead_letters_garbage() -> None:
    start, sim = simulate(playbook("pure"), "e-pure")
    table: dict[str, bytes] = {}
    cache = StateCache()
    key = b"e-pure"
    out = apply_batch(table, [Record(encode(start), key, "req", 0, 0), Record(b"{garbage", key, "req", 0, 1),
                              Record(encode(start), b"someone-else", "req", 0, 2)], now=T0, cache=cache)
    table.update(out.states)
    assert [d.reason.split(":")[0] for d in out.dead_letters] == ["invalid message", "misrouted message"]
    assert out.dead_letters[0].original_value() == b"{garbage" and out.dead_letters[0].source_offset == 1
    commands, events = list(out.commands), list(out.events)
    while not any(e.event_type in TERMINAL_EVENTS for e in events):
        (cmd,) = commands[-1:]
        facts = answer(cmd, ok(cmd), T0)
        out = apply_batch(table, [Record(encode(m), key) for m in facts + facts], now=T0, cache=cache)  # twice
        assert out.stale == 2 and out.folded == 4
        table.update(out.states)
        commands += out.commands
        events += out.events
    assert events == sim.events
    assert [c.command_id for c in commands] == [c.command_id for c in sim.commands]
    again = apply_batch(table, [Record(encode(start), key)], now=T0, cache=StateCache())   # parsed afresh
    assert again.stale == 1 and not again.states and not again.events and not again.commands


def test_apply_batch_without_a_cache_fails_only_the_execution_whose_fold_raised(monkeypatch: Any) -> None:
    import noetl_common.batch as batch

    start, _ = simulate(playbook("boom"), "e-boom")
    other, other_sim = simulate(playbook("calm"), "e-calm")
    real = batch.advance
    calls = {"n": 0}

    def flaky(state: Any, msg: Any, caps: Any) -> Any:     # the batch passes the runtime's caps on
        if msg.execution_id == "e-boom":
            calls["n"] += 1
            if calls["n"] == 2:
                state.workload["half"] = "mutated"     # half-mutate, then blow up
                raise RuntimeError("boom")
        return real(state, msg, caps)

    monkeypatch.setattr(batch, "advance", flaky)
    table: dict[str, bytes] = {}
    first = apply_batch(table, [encode(start), encode(other)], now=T0)
    table.update(first.states)
    boom_cmd, calm_cmd = first.commands
    facts = answer(boom_cmd, ok(boom_cmd), T0) + answer(calm_cmd, ok(calm_cmd), T0)
    out = apply_batch(table, [encode(m) for m in facts], now=T0)
    assert not out.dead_letters                                   # handled: the execution failed instead
    (failure,) = out.failures
    assert failure.execution_id == "e-boom" and not failure.quarantined and "RuntimeError: boom" in failure.trace
    failed = [e for e in out.events if e.execution_id == "e-boom"]
    assert [e.event_type for e in failed] == ["execution_failed"]
    assert failed[0].error == "message 'action_started' of command e-boom:a:1:1 could not be folded: RuntimeError: boom"
    state = ExecutionState.from_bytes(out.states["e-boom"])
    assert state.status == "FAILED" and "half" not in state.workload   # rebuilt from the snapshot, then failed
    calm = [e for e in out.events if e.execution_id == "e-calm"]
    so_far = [e for e in first.events if e.execution_id == "e-calm"] + calm
    assert calm and so_far == [e for e in other_sim.events if e.execution_id == "e-calm"][:len(so_far)]


def test_apply_batch_refuses_a_late_resend_of_a_start_it_does_not_hold() -> None:
    """A start re-sent long after it was made (record timestamp - time > half the eviction grace) is a
    duplicate of an execution that may have been evicted: refused, not run again. A start that waited in the
    topic (its record is as old as its time) still starts, and a late re-send of one the table holds is just
    stale."""
    start, _ = simulate(playbook("late"), "e-late")
    key, grace = b"e-late", 60.0
    resent = Record(encode(start), key, "req", 0, 5, timestamp=start.time + grace / 2 + 1)
    out = apply_batch({}, [resent], now=T0 + 999, late_start_after=grace)
    assert not out.states and not out.events and not out.commands
    assert [d.reason.split(":")[0] for d in out.dead_letters] == ["late duplicate start"]
    assert out.dead_letters[0].source_offset == 5 and out.dead_letters[0].original_value() == encode(start)
    waited = apply_batch({}, [Record(encode(start), key, "req", 0, 5, timestamp=start.time + grace / 2 - 1)],
                         now=T0 + 999, late_start_after=grace)
    assert not waited.dead_letters and waited.commands and set(waited.states) == {"e-late"}
    held = apply_batch(waited.states, [resent], now=T0 + 999, late_start_after=grace)
    assert held.stale == 1 and not held.dead_letters and not held.states


def test_replication_and_eviction_settings_reach_the_app(tmp_path: Path) -> None:
    from noetl_broker.app import create_app
    from noetl_broker.settings import load_broker_settings

    settings = load_broker_settings(topic_replication=3, broker_evict_after=60, broker_web=False,
                                    topic_prefix="t.settings.")
    app = create_app(settings, datadir=str(tmp_path))
    assert app.conf.topic_replication_factor == 3   # faust's own topics: the changelog and the assignor's
    assert app.noetl_broker.evictions.after == 60 and app.noetl_broker.evictions.enabled
    assert not create_app(load_broker_settings(broker_evict_after=0, broker_web=False, topic_prefix="t.s0."),
                          datadir=str(tmp_path)).noetl_broker.evictions.enabled


async def test_timer_loop_fires_live_deadlines_of_owned_partitions_once() -> None:
    from noetl_broker.timers import TimerLoop, partition_of

    fired: list[TimerFired] = []

    async def fire(due: list[TimerFired]) -> None:
        fired.extend(due)
    loop = TimerLoop(fire, partitions=PARTITIONS)
    runner = asyncio.create_task(loop.run())
    try:
        now = time.time()
        loop.update("e1", {"retry:a": now + 0.05, "lease:x": now + 0.05})
        loop.update("e1", {"retry:a": now + 0.05, "lease:x": now + 0.3})   # the lease moved later
        loop.update("e2", {"retry:b": now + 0.05})
        loop.update("e2", {})                                             # cleared (e.g. it finished)
        end = time.monotonic() + DEADLINE
        while len(fired) < 2:
            assert time.monotonic() < end, fired
            await asyncio.sleep(0.01)
        assert [(f.execution_id, f.timer) for f in fired] == [("e1", "retry:a"), ("e1", "lease:x")]
        assert fired[1].time >= now + 0.3

        # after a recovery, only the deadlines of this worker's partitions are scheduled
        owned = {partition_of("e3", PARTITIONS)}
        other = next(f"e{i}" for i in range(4, 100) if partition_of(f"e{i}", PARTITIONS) not in owned)
        snapshot = b'{"status": "RUNNING", "timers": {"retry:c": %f}}' % (time.time() - 1)
        assert loop.rebuild([("e3", snapshot), (other, snapshot)], owned) == 1
        while len(fired) < 3:
            assert time.monotonic() < end, fired
            await asyncio.sleep(0.01)
        assert (fired[2].execution_id, fired[2].timer) == ("e3", "retry:c")
        loop.revoke()
        loop.update("e3", {"retry:d": time.time()})   # a batch folded during the rebalance: not ours any more
        await asyncio.sleep(0.05)
        assert len(fired) == 3 and loop.fired == 3
    finally:
        runner.cancel()


async def test_after_a_recovery_an_overdue_lease_waits_one_lease_and_a_moved_one_never_fires() -> None:
    """The broker was away: a recovered lease deadline fires no sooner than one lease after the recovery
    (the workers' facts that waited come first); a retry delay fires when due."""
    from noetl_broker.timers import TimerLoop

    fired: list[tuple[str, str, float]] = []

    async def fire(due: list[TimerFired]) -> None:
        fired.extend((f.execution_id, f.timer, time.time()) for f in due)
    loop = TimerLoop(fire, partitions=PARTITIONS)
    runner = asyncio.create_task(loop.run())
    try:
        past = time.time() - 10
        snapshot = (b'{"status": "RUNNING", "lease_seconds": 0.4, "timers": {"lease:x": %f, "retry:a": %f}}'
                    % (past, past))
        recovered = time.time()
        assert loop.rebuild([("e1", snapshot), ("e2", snapshot)], set(range(PARTITIONS))) == 4
        end = time.monotonic() + DEADLINE
        while len(fired) < 2:
            assert time.monotonic() < end, fired
            await asyncio.sleep(0.01)
        assert sorted(f[:2] for f in fired) == [("e1", "retry:a"), ("e2", "retry:a")]   # due: at once
        assert all(at - recovered < 0.3 for _, _, at in fired)
        loop.update("e2", {"lease:x": time.time() + 30})   # a heartbeat that waited moved e2's lease later
        while len(fired) < 3:
            assert time.monotonic() < end, fired
            await asyncio.sleep(0.01)
        assert fired[2][:2] == ("e1", "lease:x") and fired[2][2] - recovered >= 0.4
        await asyncio.sleep(0.3)
        assert len(fired) == 3      # e2's held-back entry was for a deadline that moved: skipped
    finally:
        runner.cancel()


async def test_the_broker_fetch_never_takes_records_of_partitions_faust_did_not_ask_for() -> None:
    """faust hands the consumer thread its live set of active partitions; right after a table recovery it can
    be empty when the thread uses it (changelogs paused, inbound partitions not resumed yet), and aiokafka
    reads an empty set as "every partition": it handed over (and moved past) the inbound records, which faust
    dropped as not active, and a restarted broker never folded the facts that waited for it."""
    import contextlib
    import types
    from types import SimpleNamespace

    from aiokafka.consumer.fetcher import Fetcher

    from noetl_broker.transport import _ConsumerThread

    class Waiting:   # what aiokafka holds for a partition fetched ahead: handing it over is the failure
        def check_raise(self) -> None:
            raise AssertionError("records of a partition faust did not ask for were taken")

    results = TopicPartition("t.noetl.results", 0)
    fetcher = SimpleNamespace(_closed=False, _records={results: Waiting()}, _wait_consume_future=None,
                              _notify=lambda _future: None,
                              _subscriptions=SimpleNamespace(reassignment_in_progress=False, is_assigned=lambda _tp: True,
                                                             fetch_context=contextlib.nullcontext))
    fetcher.fetched_records = types.MethodType(Fetcher.fetched_records, fetcher)   # aiokafka's own selection
    thread = SimpleNamespace(consumer=SimpleNamespace(flow_active=True))
    consumer = SimpleNamespace(_closed=False, _fetcher=fetcher)
    active: set[TopicPartition] = set()   # faust's set at that moment
    assert await _ConsumerThread._fetch_records(thread, consumer, active, timeout=0) == {}
    assert results in fetcher._records   # still waiting for faust to resume the partition


async def test_seek_to_committed_rewinds_an_inbound_partition_that_was_never_committed() -> None:
    """aiokafka's seek to the committed offsets skips a partition without one, so a record faust took and
    dropped before the partition's first commit would never be read again: back to the beginning instead."""
    from types import SimpleNamespace

    from noetl_broker.transport import _ConsumerThread

    never, committed = TopicPartition("t.noetl.results", 0), TopicPartition("t.noetl.results", 1)
    changelog = TopicPartition("t.noetl-broker-executions-changelog", 0)
    rewound: list[set[TopicPartition]] = []

    class Consumer:
        async def seek_to_committed(self) -> dict[TopicPartition, int | None]:
            return {never: None, committed: 7, changelog: None}

        async def seek_to_beginning(self, *tps: TopicPartition) -> None:
            rewound.append(set(tps))

    thread = SimpleNamespace(_ensure_consumer=Consumer,
                             consumer=SimpleNamespace(_is_changelog_tp=lambda tp: tp.topic.endswith("-changelog")))
    assert await _ConsumerThread._seek_to_committed(thread) == {never: None, committed: 7, changelog: None}
    assert rewound == [{never}]   # the changelog's position is the table recovery's business


# ---------------------------------------------------------------------------------------------------------
# The broker process and the scripted worker
# ---------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BrokerProcess:
    """`python -m noetl_broker` with its settings in the environment; its log goes to a temp file."""

    def __init__(self, bootstrap: str, prefix: str, **env: str) -> None:
        self.port = _free_port()
        self.env = {**os.environ, "NOETL_KAFKA_BOOTSTRAP": bootstrap, "NOETL_TOPIC_PREFIX": prefix,
                    "NOETL_HTTP_PORT": str(self.port), "NOETL_TOPIC_PARTITIONS": str(PARTITIONS),
                    "NOETL_KAFKA_SESSION_TIMEOUT_MS": "3000", "NOETL_BROKER_COMMIT_INTERVAL": "0.5",
                    "NOETL_BROKER_TOKEN": BROKER_TOKEN,
                    "PYTHONPATH": os.pathsep.join([str(BROKER_SRC), os.environ.get("PYTHONPATH", "")]), **env}
        self.log = Path(tempfile.mkstemp(prefix="noetl-broker.", suffix=".log")[1])
        self.cwd = tempfile.mkdtemp(prefix="noetl-broker.")   # faust writes `<app id>-data` there
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "noetl_broker"], env=self.env, cwd=self.cwd,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    async def wait_ready(self, deadline: float = READY_DEADLINE) -> None:
        end = time.monotonic() + deadline
        async with httpx.AsyncClient(timeout=1.0) as client:
            while True:
                assert self.proc is not None and self.proc.poll() is None, f"broker exited:\n{self.tail()}"
                assert time.monotonic() < end, f"broker not ready within {deadline}s:\n{self.tail()}"
                try:
                    if (await client.get(f"http://127.0.0.1:{self.port}/ready")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)

    async def metrics(self) -> dict[str, float]:
        async with httpx.AsyncClient(timeout=2.0, headers={"Authorization": f"Bearer {BROKER_TOKEN}"}) as client:
            text = (await client.get(f"http://127.0.0.1:{self.port}/metrics")).text
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    async def wait_metric(self, name: str, at_least: float, deadline: float = DEADLINE) -> None:
        end = time.monotonic() + deadline
        while (await self.metrics()).get(name, 0) < at_least:
            assert time.monotonic() < end, f"{name} < {at_least} after {deadline}s:\n{self.tail()}"
            await asyncio.sleep(0.05)

    async def wait_durable(self, deadline: float = DEADLINE) -> dict[str, float]:
        """Until every batch folded so far is durable (effects and snapshots acknowledged by Kafka)."""
        end = time.monotonic() + deadline
        while True:
            m = await self.metrics()
            if m["noetl_broker_batches_durable_total"] >= m["noetl_broker_batches_total"]:
                return m
            assert time.monotonic() < end, f"batches not durable after {deadline}s:\n{self.tail()}"
            await asyncio.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.stop()
        if os.environ.get("NOETL_TEST_KEEP_LOGS"):
            print(f"broker log: {self.log}")
        else:
            self.log.unlink(missing_ok=True)
        shutil.rmtree(self.cwd, ignore_errors=True)


class Worker:
    """Plays the worker pool and the observer: reads commands, events and dead letters from the earliest
    offset (manual assignment: no group), and produces facts to noetl.results."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.commands: dict[str, list[Command]] = {}
        self.events: dict[str, list[Event]] = {}
        self.dead_letters: list[DeadLetter] = []
        self.answered: dict[str, int] = {}    # per execution: how many of its commands were answered

    async def __aenter__(self) -> Worker:
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=False)
        # a short fetch wait: Tansu answers a waiting fetch only when the wait is over (noetl_broker.transport)
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, fetch_max_wait_ms=10,
                                         enable_auto_commit=False, auto_offset_reset="earliest")
        await self.producer.start()
        await self.consumer.start()
        self.consumer.assign([TopicPartition(topic, p) for topic in
                              (self.topics.commands(), self.topics.events, self.topics.dlq)
                              for p in range(PARTITIONS)])
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.consumer.stop()
        await self.producer.stop()

    async def send(self, topic: str, *messages: Any) -> None:
        for message in messages:
            await self.producer.send_and_wait(topic, encode(message), key=message.execution_id.encode())

    async def send_raw(self, topic: str, value: bytes, key: bytes) -> None:
        await self.producer.send_and_wait(topic, value, key=key)

    async def pump(self) -> None:
        for records in (await self.consumer.getmany(timeout_ms=50)).values():
            for record in records:
                if record.topic == self.topics.events:
                    event = decode_event(record.value)
                    self.events.setdefault(event.execution_id, []).append(event)
                elif record.topic == self.topics.dlq:
                    self.dead_letters.append(DeadLetter.model_validate_json(record.value))
                else:
                    command = decode_command(record.value)
                    self.commands.setdefault(command.execution_id, []).append(command)

    async def until(self, done: Callable[[], Any], what: str, deadline: float = DEADLINE) -> Any:
        end = time.monotonic() + deadline
        while not (result := done()):
            assert time.monotonic() < end, f"no {what} within {deadline}s"
            await self.pump()
        return result

    def finished(self, execution_id: str) -> bool:
        return any(e.event_type in TERMINAL_EVENTS for e in self.events.get(execution_id, []))

    async def drive(self, execution_id: str, respond: Callable[[Command], list[Any]],
                    stop: Callable[[], bool] | None = None, deadline: float = DEADLINE) -> None:
        """Answer each new command of the execution (and of its children) with `respond(command)` until it
        finishes (or `stop`)."""
        stop = stop or (lambda: self.finished(execution_id))
        end = time.monotonic() + deadline
        while not stop():
            assert time.monotonic() < end, f"{execution_id} did not finish within {deadline}s"
            for eid, commands in list(self.commands.items()):
                if execution_id not in eid:   # the execution and its children (their ids contain it)
                    continue
                answered = self.answered.get(eid, 0)
                if answered < len(commands):
                    for message in respond(commands[answered]):   # a child's start goes to requests
                        topic = self.topics.requests if isinstance(message, StartExecution) else self.topics.results
                        await self.send(topic, message)
                    self.answered[eid] = answered + 1
                    break
            else:
                await self.pump()


def _prefix(name: str) -> str:
    return f"t.{name}.{uuid.uuid4().hex[:8]}."


@pytest.fixture(scope="module")
def shared_broker(kafka_bootstrap: str) -> Iterator[tuple[BrokerProcess, Topics]]:
    """One broker for the scenarios that need no restart (each uses its own execution ids)."""
    topics = Topics(prefix=_prefix("broker"))
    broker = BrokerProcess(kafka_bootstrap, topics.prefix, NOETL_BROKER_SESSION_TIMEOUT="3")
    broker.start()
    try:
        asyncio.run(broker.wait_ready())
        yield broker, topics
    finally:
        broker.close()


# ---------------------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------------------
async def test_execution_runs_through_the_broker_and_duplicates_change_nothing(
        kafka_bootstrap: str, shared_broker: tuple[BrokerProcess, Topics]) -> None:
    broker, topics = shared_broker
    eid, now = f"dup-{uuid.uuid4().hex[:8]}", time.time()
    start, sim = simulate(playbook("dup"), eid, now=now)
    async with Worker(kafka_bootstrap, topics) as worker:
        before = await broker.metrics()
        await worker.send(topics.requests, start, start)     # a duplicated start, too
        # every fact twice, back to back: the second of each is a duplicate
        await worker.drive(eid, lambda cmd: [m for m in answer(cmd, ok(cmd), now) for _ in range(2)])
        sent = 2 + 4 * len(sim.commands)
        await broker.wait_metric("noetl_broker_inbound_total", before["noetl_broker_inbound_total"] + sent)
        await worker.pump()
        after = await broker.metrics()
    assert [f"{e.event_type}:{e.node_name}" for e in worker.events[eid]][-1] == "execution_complete:dup"
    assert worker.events[eid] == sim.events                        # nothing extra, nothing missing
    assert [c.command_id for c in worker.commands[eid]] == [c.command_id for c in sim.commands]
    assert after["noetl_broker_stale_total"] - before["noetl_broker_stale_total"] == sent // 2


async def test_result_for_a_stale_attempt_is_ignored(
        kafka_bootstrap: str, shared_broker: tuple[BrokerProcess, Topics]) -> None:
    broker, topics = shared_broker
    eid, now = f"stale-{uuid.uuid4().hex[:8]}", time.time()
    document = playbook("stale", {"retry": {"max_attempts": 3}})

    def flaky(cmd: Command) -> Outcome:
        return Outcome(ok=False, error="boom") if cmd.step == "a" and cmd.attempt == 1 else ok(cmd)
    start, sim = simulate(document, eid, flaky, now=now)
    late = ActionCompleted(execution_id=eid, command_id=f"{eid}:a:1:1", time=now, result={"late": True})

    def respond(cmd: Command) -> list[Any]:
        facts = answer(cmd, flaky(cmd), now)
        # attempt 1 failed and attempt 2 is running: a late success of attempt 1 must change nothing
        return [late, *facts] if cmd.step == "a" and cmd.attempt == 2 else facts
    async with Worker(kafka_bootstrap, topics) as worker:
        await worker.send(topics.requests, start)
        await worker.drive(eid, respond)
    assert worker.events[eid] == sim.events
    assert [(c.step, c.attempt) for c in worker.commands[eid]] == [("a", 1), ("a", 2), ("b", 1)]
    completed_a = [e for e in worker.events[eid] if e.event_type == "step_completed" and e.node_name == "a"]
    assert [e.result for e in completed_a] == [{"step": "a", "attempt": 2}]


async def test_retry_delay_fires_from_the_durable_timer_loop(
        kafka_bootstrap: str, shared_broker: tuple[BrokerProcess, Topics]) -> None:
    broker, topics = shared_broker
    eid = f"timer-{uuid.uuid4().hex[:8]}"
    document = playbook("timer", {"retry": {"max_attempts": 2, "initial_delay": 0.3}})
    failed_at: dict[int, float] = {}

    def respond(cmd: Command) -> list[Any]:
        now = time.time()   # real time: the deadline is now + 0.3 s, so only the timer loop can release it
        if cmd.step == "a" and cmd.attempt == 1:
            failed_at[1] = now
            return answer(cmd, Outcome(ok=False, error="try again"), now)
        return answer(cmd, ok(cmd), now)
    async with Worker(kafka_bootstrap, topics) as worker:
        await worker.send(topics.requests, StartExecution(execution_id=eid, time=time.time(), playbook=document,
                                                         path="tests/timer"))
        await worker.drive(eid, respond)
    events = [f"{e.event_type}:{e.node_name}" for e in worker.events[eid]]
    assert "action_retry:a" in events and events[-1] == "execution_complete:timer"
    retried = [c for c in worker.commands[eid] if c.step == "a" and c.attempt == 2]
    assert len(retried) == 1 and retried[0].time >= failed_at[1] + 0.3   # dispatched by a TimerFired at ≥ due
    assert (await broker.metrics())["noetl_broker_timers_fired_total"] >= 1


async def test_malformed_records_go_to_the_dlq_and_their_partition_keeps_flowing(
        kafka_bootstrap: str, shared_broker: tuple[BrokerProcess, Topics]) -> None:
    broker, topics = shared_broker
    eid, now = f"dlq-{uuid.uuid4().hex[:8]}", time.time()
    start, sim = simulate(playbook("dlq"), eid, now=now)
    async with Worker(kafka_bootstrap, topics) as worker:
        # same key as the execution: same partition, right before its start
        await worker.send_raw(topics.requests, b'{"kind": "start", "execution_id": ', key=eid.encode())
        await worker.send_raw(topics.results, b'{"kind": "action_completed"}', key=eid.encode())
        await worker.send(topics.requests, start)
        await worker.drive(eid, lambda cmd: answer(cmd, ok(cmd), now))

        def ours() -> list[DeadLetter] | None:
            found = [d for d in worker.dead_letters if d.original_key() == eid.encode()]
            return found if len(found) >= 2 else None
        letters = await worker.until(ours, "dead letters")
    assert worker.events[eid] == sim.events
    by_topic = {d.source_topic: d for d in letters}
    assert set(by_topic) == {topics.requests, topics.results}
    assert by_topic[topics.requests].original_value() == b'{"kind": "start", "execution_id": '
    assert by_topic[topics.requests].reason.startswith("invalid message") and "Invalid JSON" in \
        by_topic[topics.requests].reason
    assert by_topic[topics.results].reason.startswith("invalid message") and "Field required" in \
        by_topic[topics.results].reason


POISON_END = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "poison", "path": "tests/poison"},
              "workload": {"n": 1},
              "workflow": [{"step": "start", "next": [{"step": "end"}]},
                           {"step": "end", "result": {"x": "{{ workload.items }}"}}]}
POISON_CYCLER = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "cyc", "path": "tests/cyc"},
                 "workflow": [{"step": "start", "next": [{"step": "s"}]},
                              {"step": "s", "type": "python", "data": {"x": "{{ cycler }}"},
                               "code": "def main(x):\n    return x\n", "next": [{"step": "end"}]},
                              {"step": "end"}]}
DOTTED = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "dotted", "path": "tests/dotted"},
          "workflow": [{"step": "start", "next": [{"step": "call"}]},
                       {"step": "call", "type": "http", "endpoint": "http://127.0.0.1:1/x",
                        "headers": {"X.Token": "{{ secret.TOKEN }}"}, "next": [{"step": "end"}]},
                       {"step": "end"}]}


async def test_poison_playbooks_fail_naming_the_template_while_others_complete(
        kafka_bootstrap: str, shared_broker: tuple[BrokerProcess, Topics]) -> None:
    """Issue 8: these used to crash the broker on the same record at every restart (or raise KeyError in the
    fold). Now each fails its own execution with a message naming the template, an execution folded in the
    same batches completes, and the broker stays up and ready."""
    broker, topics = shared_broker
    tag, now = uuid.uuid4().hex[:8], time.time()
    good, poison, cyc, dotted = (f"{name}-{tag}" for name in ("good", "poison", "cyc", "dotted"))
    starts = [StartExecution(execution_id=eid, time=now, playbook=document, path=document["metadata"]["path"])
              for eid, document in ((good, playbook("good")), (poison, POISON_END), (cyc, POISON_CYCLER),
                                    (dotted, DOTTED))]
    async with Worker(kafka_bootstrap, topics) as worker:
        before = await broker.metrics()
        await worker.send(topics.requests, *starts)
        await worker.drive(good, lambda cmd: answer(cmd, ok(cmd), now))
        await worker.drive(dotted, lambda cmd: answer(cmd, ok(cmd), now))
        await worker.until(lambda: worker.finished(poison) and worker.finished(cyc), "the poison executions' end")
        after = await broker.metrics()
    assert worker.events[good][-1].event_type == "execution_complete"
    assert worker.events[poison][-1].event_type == "execution_failed"
    assert worker.events[poison][-1].error == (
        "step 'end' failed: result: `workload.items` is a method of the mapping, not a value (the mapping has no "
        "key 'items') in template '{{ workload.items }}'")
    assert worker.events[cyc][-1].error == (
        "step 's' failed: data.x: `cycler` is a class (Cycler), not a value in template '{{ cycler }}'")
    (call,) = [c for c in worker.commands[dotted] if c.step == "call"]
    assert call.action.deferred == [["config", "headers", "X.Token"]]
    assert worker.events[dotted][-1].event_type == "execution_complete"
    assert after["noetl_broker_dead_letters_total"] == before["noetl_broker_dead_letters_total"]
    assert after["noetl_broker_fold_errors_total"] == before["noetl_broker_fold_errors_total"]
    assert broker.proc is not None and broker.proc.poll() is None and after["noetl_broker_ready"] == 1


def test_hostile_playbooks_through_the_real_broker(kafka_bootstrap: str,
                                                  shared_broker: tuple[BrokerProcess, Topics]) -> None:
    """The property test's playbooks (tests/hostile.py) through the real broker on Kafka: every execution
    ends (this test answers every command), a canary folded with them gives exactly the simulator's events,
    the broker never needs its error path (fold_errors), never dies and stays ready."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from hostile import CANARY, playbooks

    broker, topics = shared_broker
    loop = asyncio.new_event_loop()
    worker = Worker(kafka_bootstrap, topics)
    loop.run_until_complete(worker.__aenter__())
    before = loop.run_until_complete(broker.metrics())

    @settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
    @given(documents=st.lists(playbooks("h"), min_size=1, max_size=3))
    def check(documents: list[dict[str, Any]]) -> None:
        tag, now = uuid.uuid4().hex[:8], time.time()
        ids = [f"hostile-{tag}-{i}" for i in range(len(documents))]
        canary_worker = lambda cmd: Outcome(result={"y": 21})   # noqa: E731
        canary, sim = simulate(CANARY, f"canary-{tag}", canary_worker, now=now)

        async def run() -> None:
            await worker.send(topics.requests, canary, *(
                StartExecution(execution_id=eid, time=now, playbook=d, path="t/h") for eid, d in zip(ids, documents)))
            for eid in ids:
                await worker.drive(eid, lambda cmd: answer(cmd, ok(cmd), now), deadline=60)
            await worker.drive(canary.execution_id, lambda cmd: answer(cmd, canary_worker(cmd), now), deadline=60)
        loop.run_until_complete(run())
        assert worker.events[canary.execution_id] == sim.events
        assert sim.events[-1].event_type == "execution_complete" and sim.events[-1].result == {"y": 21}
        assert broker.proc is not None and broker.proc.poll() is None

    try:
        check()
        after = loop.run_until_complete(broker.metrics())
    finally:
        loop.run_until_complete(worker.__aexit__(None, None, None))
        loop.close()
    assert after["noetl_broker_fold_errors_total"] == before["noetl_broker_fold_errors_total"]
    assert after["noetl_broker_ready"] == 1


async def test_an_unreadable_snapshot_quarantines_its_execution_and_nothing_else(kafka_bootstrap: str) -> None:
    """A snapshot the broker cannot read (corrupt, or from an incompatible version) used to crash the broker at
    the first message for its execution, at every restart. Now that execution is quarantined: a FAILED
    `execution_failed` event with meta.quarantined, its parent told, the message dead-lettered with the
    reason; the broker goes on folding the other executions."""
    topics = Topics(prefix=_prefix("quarantine"))
    broker = BrokerProcess(kafka_bootstrap, topics.prefix, NOETL_BROKER_SESSION_TIMEOUT="3")
    tag, now = uuid.uuid4().hex[:8], time.time()
    broken, parent, good = f"broken-{tag}", f"parent-{tag}", f"good-{tag}"
    snapshot = json.dumps({"execution_id": broken, "status": "RUNNING", "seq": 7, "path": "tests/broken",
                           "parent_execution_id": parent, "parent_command_id": f"{parent}:call:1:1",
                           "steps": "not what a state holds"}).encode()
    broker.start()
    try:
        await broker.wait_ready()
        async with Worker(kafka_bootstrap, topics) as worker:
            changelog = f"{topics.prefix}noetl-broker-executions-changelog"
            await worker.send_raw(changelog, snapshot, key=broken.encode())   # what a recovery will read
            broker.stop()
            broker.start()
            await broker.wait_ready()
            # the facts' times from here: the broker's lease timers run on the wall clock, and a restart on a
            # loaded machine can take longer than a lease
            now = time.time()
            fact = ActionCompleted(execution_id=broken, command_id=f"{broken}:a:1:1", time=now, result=1)
            start, sim = simulate(playbook("good"), good, now=now)
            await worker.send(topics.results, fact)
            await worker.send(topics.requests, start)
            await worker.drive(good, lambda cmd: answer(cmd, ok(cmd), now))
            await worker.until(lambda: worker.finished(broken), "the quarantine")
            letters = await worker.until(
                lambda: [d for d in worker.dead_letters if d.original_key() == broken.encode()], "a dead letter")
            parent_told = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None, fetch_max_wait_ms=10,
                                           auto_offset_reset="earliest")
            await parent_told.start()
            try:
                parent_told.assign([TopicPartition(topics.requests, p) for p in range(PARTITIONS)])
                end, told = time.monotonic() + DEADLINE, []
                while not told:
                    assert time.monotonic() < end, "the parent was not told"
                    for records in (await parent_told.getmany(timeout_ms=100)).values():
                        told += [r for r in records if r.key == parent.encode()]
            finally:
                await parent_told.stop()
            m = await broker.metrics()
            alive = broker.proc is not None and broker.proc.poll() is None
    finally:
        broker.close()
    (event,) = {e.event_id: e for e in worker.events[broken]}.values()
    assert event.event_type == "execution_failed" and event.seq == 7 and event.meta == {"quarantined": True}
    assert event.error.startswith("quarantined: its state cannot be read: ValidationError")
    assert letters[0].reason.startswith(f"execution {broken} quarantined: its state cannot be read")
    assert letters[0].original_value() == encode(fact)
    finished = json.loads(told[0].value)
    assert finished["kind"] == "child_finished" and finished["status"] == "FAILED"
    assert finished["command_id"] == f"{parent}:call:1:1"
    # a rebalance after the restart may replay uncommitted records: repeats carry the same ids (at-least-once)
    assert list({e.event_id: e for e in worker.events[good]}.values()) == sim.events
    assert alive and m["noetl_broker_quarantined_total"] >= 1 and m["noetl_broker_ready"] == 1


PARENT = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "parent", "path": "tests/parent"},
          "workflow": [{"step": "start", "next": [{"step": "call"}]},
                       {"step": "call", "type": "playbook", "path": "tests/kid", "return_step": "work",
                        "data": {"x": 7}, "next": [{"step": "end"}]},
                       {"step": "end", "result": "{{ call.product }}"}]}
KID = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "kid", "path": "tests/kid"},
       "workload": {"x": 1},
       "workflow": [{"step": "start", "next": [{"step": "work"}]},
                    {"step": "work", "type": "python", "data": {"x": "{{ workload.x }}"},
                     "code": "def main(x):\n    return {'product': x * 3}\n", "next": [{"step": "end"}]},
                    {"step": "end"}]}


async def test_child_playbook_completion_is_routed_to_the_parent(
        kafka_bootstrap: str, shared_broker: tuple[BrokerProcess, Topics]) -> None:
    broker, topics = shared_broker
    eid, now = f"parent-{uuid.uuid4().hex[:8]}", time.time()

    def product(cmd: Command) -> Outcome:
        return Outcome(result={"product": cmd.action.data["x"] * 3})
    start, sim = simulate(PARENT, eid, product, now=now, catalog={"tests/kid": KID})
    child = f"child:{eid}:call:1:1"

    def respond(cmd: Command) -> list[Any]:
        """The worker's part, as the simulator plays it: a playbook command starts the child (a request on
        the child's key) and reports ChildStarted; the child's ChildFinished comes from the broker."""
        if cmd.action.type == "playbook":
            return [ActionStarted(execution_id=eid, command_id=cmd.command_id, time=now, token=cmd.token),
                    StartExecution(execution_id=child, time=now, playbook=KID, path="tests/kid",
                                   payload=cmd.action.data, parent_execution_id=eid,
                                   parent_command_id=cmd.command_id, parent_step=cmd.step,
                                   return_step=cmd.action.config.get("return_step"),
                                   fact_key=sim_key(child), parent_token=cmd.token),
                    ChildStarted(execution_id=eid, command_id=cmd.command_id, child_execution_id=child, time=now,
                                 token=cmd.token)]
        return answer(cmd, product(cmd), now)
    async with Worker(kafka_bootstrap, topics) as worker:
        before = await broker.metrics()
        await worker.send(topics.requests, start)
        await worker.drive(eid, respond)
    assert sim.state(eid).result == 21
    assert worker.events[child] == [e for e in sim.events if e.execution_id == child]
    assert worker.events[eid] == [e for e in sim.events if e.execution_id == eid]   # completed by ChildFinished
    assert worker.events[eid][-1].result == 21
    assert (await broker.metrics())["noetl_broker_requests_total"] - before["noetl_broker_requests_total"] == 1


async def test_broker_restart_mid_execution_resumes_from_its_table(kafka_bootstrap: str) -> None:
    topics = Topics(prefix=_prefix("restart"))
    broker = BrokerProcess(kafka_bootstrap, topics.prefix, NOETL_BROKER_SESSION_TIMEOUT="3")
    eid, now = f"restart-{uuid.uuid4().hex[:8]}", time.time()
    start, sim = simulate(playbook("restart"), eid, now=now)
    broker.start()
    try:
        await broker.wait_ready()
        async with Worker(kafka_bootstrap, topics) as worker:
            await worker.send(topics.requests, start)
            # run a, then stop answering once b's command is out: the broker dies between a and b
            await worker.drive(eid, lambda cmd: answer(cmd, ok(cmd), now),
                               stop=lambda: any(c.step == "b" for c in worker.commands.get(eid, [])))
            await broker.wait_durable()                                 # b's dispatch is in the changelog
            broker.kill()                                               # SIGKILL: no commit, no goodbye
            broker.start()
            await broker.wait_ready()
            await worker.drive(eid, lambda cmd: answer(cmd, ok(cmd), now))
            await worker.pump()
    finally:
        broker.close()
    assert worker.events[eid] == sim.events                        # no lost and no repeated event
    per_step: dict[str, int] = {}
    for command in worker.commands[eid]:
        per_step[command.step] = per_step.get(command.step, 0) + 1
    assert per_step == {"a": 1, "b": 1}                             # no step dispatched twice


async def test_finished_executions_are_evicted_and_a_late_resend_does_not_restart_them(
        kafka_bootstrap: str) -> None:
    topics = Topics(prefix=_prefix("evict"))
    broker = BrokerProcess(kafka_bootstrap, topics.prefix, NOETL_BROKER_SESSION_TIMEOUT="3",
                           NOETL_BROKER_EVICT_AFTER="6")
    broker.start()
    try:
        await broker.wait_ready()
        # Made now, and the facts stamped now: eviction is due 6 s later, and a start produced more than 3 s
        # (half the grace) after its time is refused as a late re-send. The re-send below comes after the
        # eviction, so more than 6 s after its time.
        eid, now = f"evict-{uuid.uuid4().hex[:8]}", time.time()
        start, sim = simulate(playbook("evict"), eid, now=now)
        async with Worker(kafka_bootstrap, topics) as worker:
            await worker.send(topics.requests, start)
            await worker.drive(eid, lambda cmd: answer(cmd, ok(cmd), now))
            assert (await broker.metrics())["noetl_broker_table_states"] == 1
            await broker.wait_metric("noetl_broker_evicted_total", 1)
            m = await broker.wait_durable()                            # the tombstone is in the changelog
            assert m["noetl_broker_table_states"] == 0
            # a restarted broker recovers the changelog: the tombstone keeps the execution out of the table
            broker.stop()
            broker.start()
            await broker.wait_ready()
            assert (await broker.metrics())["noetl_broker_table_states"] == 0
            await worker.send(topics.requests, start)                  # the same request, re-sent late
            letters = await worker.until(
                lambda: [d for d in worker.dead_letters if d.original_key() == eid.encode()], "a dead letter")
            await worker.pump()
            m = await broker.metrics()
    finally:
        broker.close()
    assert letters[0].reason.startswith("late duplicate start") and letters[0].original_value() == encode(start)
    assert worker.events[eid] == sim.events                            # it did not run again
    assert m["noetl_broker_table_states"] == 0 and m["noetl_broker_evicted_total"] == 0


async def test_the_brokers_explain_and_metrics_need_its_token(shared_broker: tuple[BrokerProcess, Topics]) -> None:
    """The broker's web server (faust's): probes open; /explain and /metrics take NOETL_BROKER_TOKEN, and
    the API and query roles' explainer sends it (docs/security.md "The broker's listener")."""
    from noetl_query.broker_explain import BrokerExplainer
    from noetl_query.handlers import NoLiveState

    broker, _topics = shared_broker
    base = f"http://127.0.0.1:{broker.port}"
    async with httpx.AsyncClient(timeout=5.0) as client:
        assert (await client.get(f"{base}/health")).status_code == 200
        assert (await client.get(f"{base}/ready")).status_code == 200
        wrong = [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {BROKER_TOKEN}"},
                 {"Authorization": f"Bearer {BROKER_TOKEN}x"}, {"Authorization": "Bearer " + "a" * 8000},
                 {"Authorization": "Bearer"}, {"Authorization": f"Bearer {BROKER_TOKEN[:-1]}\u00e9".encode()}]
        for headers in wrong:
            for path in ("/metrics", "/explain/some-execution", "/explain/..%2F..%2Fetc"):
                answer = await client.get(base + path, headers=headers)
                assert answer.status_code == 401, (path, headers, answer.text)
                assert answer.headers.get("WWW-Authenticate") == "Bearer"
                assert BROKER_TOKEN not in answer.text
        huge = await client.get(f"{base}/metrics", headers={"Authorization": "Bearer " + "a" * 9000})
        assert huge.status_code == 400   # aiohttp refuses a header over 8190 bytes before any view runs
        good = {"Authorization": f"Bearer {BROKER_TOKEN}"}
        metrics = await client.get(f"{base}/metrics", headers=good)
        assert metrics.status_code == 200 and "noetl_broker_forged_facts_total" in metrics.text
        unknown = await client.get(f"{base}/explain/no-such-execution", headers=good)
        assert unknown.status_code == 404, unknown.text   # past the guard: the table has no such state
    assert await BrokerExplainer(base, token=BROKER_TOKEN)("no-such-execution", time.time()) is None
    with pytest.raises(NoLiveState, match="NOETL_BROKER_TOKEN"):
        await BrokerExplainer(base)("no-such-execution", time.time())
    with pytest.raises(NoLiveState, match="NOETL_BROKER_TOKEN"):
        await BrokerExplainer(base, token="not-the-token")("no-such-execution", time.time())
