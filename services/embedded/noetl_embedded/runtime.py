"""The embedded runtime: every role in one process around the same fold (architecture §3).

fold loop   inbound bytes → noetl_common.batch.fold_batch (the broker's batch fold too) → one SQLite
            transaction per batch (events + state snapshots + dead letters) → commands to the worker loop,
            requests back to inbound, deadlines to the timer loop
worker loop commands → noetl_worker.execute (python in a process pool) → facts back to inbound
Restart: in-flight states are loaded, their deadlines rescheduled and their in-flight commands resent.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any, Callable

from noetl_common.batch import BatchOutput, Record, dead_letter, fold_batch
from noetl_common.caps import DEFAULT_CAPS, Caps
from noetl_common.codec import DecodeError, decode_command, decode_inbound, encode
from noetl_common.engine.actions import redeliver
from noetl_common.engine.lifecycle import child_finished
from noetl_common.engine.leases import recovered_fire_time
from noetl_common.engine.quarantine import quarantine
from noetl_common.explain import explain
from noetl_common.messages import (DEFAULT_LEASE_RETRIES, DEFAULT_LEASE_RETRY_DELAY, CancelExecution, Event,
                                   StartExecution)
from noetl_common.state import ExecutionState
from noetl_common.topics import Topics
from noetl_runtime.bus import InMemoryBus
from noetl_runtime.fact_keys import new_fact_key
from noetl_runtime.sqlite_store import SqliteStore
from noetl_runtime.timers import TimerLoop
from noetl_runtime.tuning import tune_gc
from noetl_worker.execute import execute
from noetl_worker.ports import WorkerPorts
from noetl_worker.python_pool import PythonPool

log = logging.getLogger("noetl.embedded")
EventListener = Callable[[Event], None]


class EmbeddedRuntime:
    def __init__(self, store: SqliteStore, *, concurrency: int = 64, python_processes: int | None = None,
                 lease_seconds: float = 30.0, batch_size: int = 1000, resume: bool = True,
                 lease_retries: int = DEFAULT_LEASE_RETRIES, lease_retry_delay: float = DEFAULT_LEASE_RETRY_DELAY,
                 caps: Caps = DEFAULT_CAPS) -> None:
        self.resume = resume   # `noetl server` resumes in-flight executions; `noetl run` runs only its own
        self.store = store
        # The operator's caps (NOETL_MAX_VISITS, NOETL_MAX_ITERATOR_ITEMS), recorded by each execution it starts
        self.caps = caps.for_fold()
        self.topics = Topics()
        self.bus = InMemoryBus()
        self.lease_seconds = lease_seconds
        self.lease_retries, self.lease_retry_delay = lease_retries, lease_retry_delay
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.python_processes = python_processes or max(2, os.cpu_count() or 2)
        self.states: dict[str, ExecutionState] = {}
        self.dead_lettered = 0   # messages written to the store's dead_letters table by this process
        self.forged_facts = 0    # facts dropped because they did not carry their attempt's token
        self.final: dict[str, ExecutionState] = {}   # finished executions (their state stays in the store too)
        self._view = _MemoryStates(self)
        self._waiters: dict[str, list[asyncio.Future[ExecutionState]]] = {}
        self._listeners: list[EventListener] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._running: set[asyncio.Task[Any]] = set()
        self.timers = TimerLoop(self._timer_fired)
        self.pool: PythonPool | None = None
        self.crashed: BaseException | None = None
        self.stopping = False   # request_stop() was called: workers' facts and timers are no longer folded

    # ------------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.stopping = False
        tune_gc()
        self.pool = PythonPool(self.python_processes)
        self.ports = WorkerPorts(emit=self._emit, credentials=self.store.credentials, catalog=self.store.catalog,
                                 python_pool=self.pool, worker_id=f"embedded-{os.getpid()}")
        if self.resume:
            await self._resume()
        self._tasks = [asyncio.create_task(self._fold_loop(), name="fold"),
                       asyncio.create_task(self._worker_loop(), name="worker")]
        for task in self._tasks:
            task.add_done_callback(self._loop_died)

    def _loop_died(self, task: asyncio.Task[Any]) -> None:
        """A loop must never end while the runtime runs: fail every waiter loudly instead of hanging."""
        if task.cancelled():
            return
        error = task.exception() or RuntimeError(f"{task.get_name()} loop ended")
        log.error("the %s loop died: %r", task.get_name(), error, exc_info=error)
        self.crashed = error
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(RuntimeError(f"embedded runtime {task.get_name()} loop died: {error!r}"))

    async def _resume(self) -> None:
        """Load in-flight executions, reschedule their deadlines and resend what was in flight. A child
        that finished (or never started) while the process was down is reconciled from its snapshot. A
        snapshot that cannot be read or resumed quarantines its execution (it never stops the others)."""
        for execution_id, raw in (await self.store.load_states()).items():
            try:
                state = ExecutionState.from_bytes(raw)
                commands = redeliver(state, include_children=True)
            except Exception as exc:
                log.exception("execution %s cannot be resumed: quarantined", execution_id)
                await self._quarantine_at_resume(execution_id, raw, f"its state cannot be resumed: "
                                                                    f"{type(exc).__name__}: {exc}")
                continue
            self.states[execution_id] = state
            now = time.time()   # the workers that held its leases died with the process: a full lease each
            for key, due in state.timers.items():
                self.timers.schedule(execution_id, key, recovered_fire_time(key, due, state.lease_seconds, now))
            children = {w.command_id: w.child_execution_id for w in state.work.values() if w.child_execution_id}
            for command in commands:
                child_id = children.get(command.command_id)
                child_raw = await self.store.load_state(child_id) if child_id else None
                if child_id and child_raw is not None:
                    try:
                        finished = child_finished(ExecutionState.from_bytes(child_raw), time.time())
                    except Exception:   # an unreadable child is quarantined on its own turn, which tells us
                        continue
                    if finished is not None:   # finished while we were down: tell the parent again
                        self._publish_inbound(finished)
                    continue                   # still running: it resumes by itself and reports back
                self.bus.publish(self.topics.commands(command.pool), command.execution_id, encode(command))

    async def _quarantine_at_resume(self, execution_id: str, raw: bytes, reason: str) -> None:
        now = time.time()
        transition = quarantine(execution_id, reason, now, raw=raw)
        assert transition.state is not None
        letter = dead_letter(Record(value=raw, key=execution_id.encode(), topic="states"),
                             f"execution {execution_id} quarantined: {reason}", now)
        await asyncio.to_thread(self.store.commit_batch_sync, transition.events,
                                {execution_id: transition.state.to_bytes()}, [execution_id],
                                bodies=[encode(e) for e in transition.events], dead_letters=[letter])
        self.dead_lettered += 1
        self.final[execution_id] = transition.state
        for request in transition.requests:
            self._publish_inbound(request)

    def request_stop(self) -> None:
        """A stop was asked for (`noetl server` got SIGTERM/SIGINT): from now on no attempt starts, no
        worker's fact (started, heartbeat, completed, failed) is recorded and no timer fires, so every attempt
        in flight is abandoned exactly as a crash leaves it: still in flight in the store, redelivered by the
        restart with a full lease, same command id and attempt number (docs/embedded.md, "Stopping").
        Recording nothing is the point: the signal that stops us may also reach the step processes (a process
        group, a systemd cgroup), and a failure seen now would be the stop's doing, not the step's; a lease
        left without heartbeats must not expire either. Safe in a signal handler (it only sets a flag)."""
        self.stopping = True

    async def stop(self) -> None:
        self.stopping = True
        self.timers.stop()
        for task in [*self._tasks, *self._running]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._running, return_exceptions=True)
        if self.pool is not None:
            self.pool.close()

    # ------------------------------------------------------------------------------------------ API
    def submit(self, start: StartExecution) -> str:
        """Accept a message from outside. It must survive the trip through the codec (a value no reader takes
        back, e.g. an int of 5,000 digits, is refused here with a DecodeError), or the fold would dead-letter
        an execution its caller was told exists."""
        raw = encode(start)
        decode_inbound(raw)
        self.bus.publish(self.topics.requests, start.execution_id, raw)
        return start.execution_id

    def start_message(self, document: dict[str, Any], path: str, version: int | None, payload: dict[str, Any],
                      now: float, execution_id: str | None = None) -> StartExecution:
        return StartExecution(execution_id=execution_id or str(uuid.uuid4()), time=now, playbook=document,
                              path=path, version=version, payload=payload, lease_seconds=self.lease_seconds,
                              lease_retries=self.lease_retries, lease_retry_delay=self.lease_retry_delay,
                              fact_key=new_fact_key())

    def cancel(self, execution_id: str, now: float, reason: str = "cancelled by request") -> None:
        self._publish_inbound(CancelExecution(execution_id=execution_id, time=now, reason=reason))

    async def wait(self, execution_id: str) -> ExecutionState:
        state = self.final.get(execution_id)
        if state is not None:
            return state
        if self.crashed is not None:
            raise RuntimeError(f"embedded runtime died: {self.crashed!r}")
        future: asyncio.Future[ExecutionState] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(execution_id, []).append(future)
        return await future

    async def explain(self, execution_id: str, now: float) -> dict[str, Any] | None:
        """What the execution waits for, from its live state (None if this runtime never held it)."""
        state = self.states.get(execution_id) or self.final.get(execution_id)
        return explain(state, now).as_json() if state is not None else None

    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    # ------------------------------------------------------------------------------------------ loops
    def _publish_inbound(self, message: Any) -> None:
        # requests and results share one queue here: per-execution order is what matters, as on Kafka
        self.bus.publish(self.topics.requests, message.execution_id, encode(message))

    def _timer_fired(self, message: Any) -> None:
        if not self.stopping:   # the restart reschedules every deadline from the states
            self._publish_inbound(message)

    async def _emit(self, message: Any) -> None:
        if self.stopping:   # abandoned: the restart reruns the attempt (request_stop)
            return
        self._publish_inbound(message)

    async def _fold_loop(self) -> None:
        while True:
            batch = await self.bus.take(self.topics.requests, self.batch_size)
            await self._fold_batch(batch)

    async def _fold_batch(self, batch: list[tuple[str, bytes]]) -> None:
        """One batch through the shared batch fold (whatever a message does, it harms only its execution),
        then one SQLite transaction, then the effects: no worker ever runs an attempt the store does not know."""
        out = fold_batch(self._view, [raw for _key, raw in batch], now=time.time(), caps=self.caps)
        _log_problems(out)
        self.forged_facts += out.forged
        if not (out.states or out.events or out.dead_letters):
            return
        # Durable before any effect (architecture invariant 6). The write happens in a thread so the workers
        # keep running meanwhile; this loop is the only writer of these states and waits.
        # a snapshot goes in two parts where it can: the store keeps the playbook once per execution
        states = {eid: out.snapshot_parts.get(eid, raw) for eid, raw in out.states.items()}
        await asyncio.to_thread(self.store.commit_batch_sync, out.events, states, out.terminal,
                                bodies=out.event_bytes, dead_letters=out.dead_letters)
        self.dead_lettered += len(out.dead_letters)
        for command, raw in zip(out.commands, out.command_bytes):
            self.bus.publish(self.topics.commands(command.pool), command.execution_id, raw)
        for request, raw in zip(out.requests, out.request_bytes):
            self.bus.publish(self.topics.requests, request.execution_id, raw)
        for execution_id, key, due in out.deadlines:
            self.timers.schedule(execution_id, key, due)
        for event in out.events:
            for listener in self._listeners:
                try:
                    listener(event)
                except Exception:   # an observer must never take the fold loop (and every execution) down
                    log.exception("event listener %r failed on event %s", listener, event.event_id)
        for eid in out.terminal:
            state = self.states.pop(eid, None)
            state = state if state is not None else self.final.get(eid)
            if state is None:
                continue
            self.final[eid] = state
            for future in self._waiters.pop(eid, []):
                if not future.done():
                    future.set_result(state)

    async def _worker_loop(self) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        while True:
            for _key, raw in await self.bus.take(self.topics.commands("default"), self.batch_size):
                if self.stopping:   # its attempt stays in flight in the state; the restart redelivers it
                    continue
                try:
                    command = decode_command(raw)
                except DecodeError as exc:
                    log.error("dead letter command: %s", exc)
                    letter = dead_letter(Record(value=raw, key=_key.encode(), topic="commands"), str(exc), time.time())
                    await asyncio.to_thread(self.store.commit_batch_sync, [], {}, dead_letters=[letter])
                    self.dead_lettered += 1
                    continue
                await slots.acquire()
                task = asyncio.create_task(execute(command, self.ports))
                self._running.add(task)
                task.add_done_callback(lambda t: (self._running.discard(t), slots.release()))


class _MemoryStates:
    """The batch fold's `States` for this runtime: the parsed states it keeps in memory (no parse, no
    serialisation per message); a replay after an error starts from the snapshot in the store."""

    def __init__(self, runtime: EmbeddedRuntime) -> None:
        self.runtime = runtime

    def take(self, execution_id: str) -> ExecutionState | None:
        state = self.runtime.states.get(execution_id)
        return state if state is not None else self.runtime.final.get(execution_id)

    def snapshot(self, execution_id: str) -> bytes | None:
        return self.runtime.store.load_state_sync(execution_id)

    def give_back(self, execution_id: str, raw: bytes | None, state: ExecutionState | None) -> None:
        runtime = self.runtime
        if state is None:
            runtime.states.pop(execution_id, None)
        elif execution_id in runtime.final:
            runtime.final[execution_id] = state
        else:
            runtime.states[execution_id] = state


def _log_problems(out: BatchOutput) -> None:
    if out.forged:   # someone holds the worker role and not the attempt's token (docs/security.md)
        log.warning("dropped %d fact(s) without their attempt's token", out.forged)
    for letter in out.dead_letters:
        log.error("dead letter: %s", letter.reason)
    for failure in out.failures:
        log.error("execution %s %s: %s\n%s", failure.execution_id,
                  "quarantined" if failure.quarantined else "failed by an error of the fold", failure.reason,
                  failure.trace)
