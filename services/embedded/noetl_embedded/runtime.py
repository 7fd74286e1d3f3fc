"""The embedded runtime: every role in one process around the same fold (architecture §3).

fold loop   inbound bytes → advance() → one SQLite transaction per batch (events + state snapshots)
            → commands to the worker loop, requests back to inbound, deadlines to the timer loop
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

from noetl_common.codec import DecodeError, decode_command, decode_inbound, encode
from noetl_common.engine import advance
from noetl_common.engine.actions import redeliver
from noetl_common.engine.lifecycle import child_finished
from noetl_common.messages import CancelExecution, Event, StartExecution
from noetl_common.state import ExecutionState
from noetl_common.topics import Topics
from noetl_runtime.bus import InMemoryBus
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
                 lease_seconds: float = 30.0, batch_size: int = 1000, resume: bool = True) -> None:
        self.resume = resume   # `noetl server` resumes in-flight executions; `noetl run` runs only its own
        self.store = store
        self.topics = Topics()
        self.bus = InMemoryBus()
        self.lease_seconds = lease_seconds
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.python_processes = python_processes or max(2, os.cpu_count() or 2)
        self.states: dict[str, ExecutionState] = {}
        self.dead_letters: list[tuple[bytes, str]] = []
        self.final: dict[str, ExecutionState] = {}   # finished executions (their state stays in the store too)
        self._waiters: dict[str, list[asyncio.Future[ExecutionState]]] = {}
        self._listeners: list[EventListener] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._running: set[asyncio.Task[Any]] = set()
        self.timers = TimerLoop(self._publish_inbound)
        self.pool: PythonPool | None = None
        self.crashed: BaseException | None = None

    # ------------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
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
        that finished (or never started) while the process was down is reconciled from its snapshot."""
        for execution_id, raw in (await self.store.load_states()).items():
            state = ExecutionState.from_bytes(raw)
            self.states[execution_id] = state
            for key, due in state.timers.items():
                self.timers.schedule(execution_id, key, due)
            children = {w.command_id: w.child_execution_id for w in state.work.values() if w.child_execution_id}
            for command in redeliver(state, include_children=True):
                child_id = children.get(command.command_id)
                child_raw = await self.store.load_state(child_id) if child_id else None
                if child_id and child_raw is not None:
                    finished = child_finished(ExecutionState.from_bytes(child_raw), time.time())
                    if finished is not None:   # finished while we were down: tell the parent again
                        self._publish_inbound(finished)
                    continue                   # still running: it resumes by itself and reports back
                self.bus.publish(self.topics.commands(command.pool), command.execution_id, encode(command))

    async def stop(self) -> None:
        self.timers.stop()
        for task in [*self._tasks, *self._running]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._running, return_exceptions=True)
        if self.pool is not None:
            self.pool.close()

    # ------------------------------------------------------------------------------------------ API
    def submit(self, start: StartExecution) -> str:
        self._publish_inbound(start)
        return start.execution_id

    def start_message(self, document: dict[str, Any], path: str, version: int | None, payload: dict[str, Any],
                      now: float, execution_id: str | None = None) -> StartExecution:
        return StartExecution(execution_id=execution_id or str(uuid.uuid4()), time=now, playbook=document,
                              path=path, version=version, payload=payload, lease_seconds=self.lease_seconds)

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

    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    # ------------------------------------------------------------------------------------------ loops
    def _publish_inbound(self, message: Any) -> None:
        # requests and results share one queue here: per-execution order is what matters, as on Kafka
        self.bus.publish(self.topics.requests, message.execution_id, encode(message))

    async def _emit(self, message: Any) -> None:
        self._publish_inbound(message)

    async def _fold_loop(self) -> None:
        while True:
            batch = await self.bus.take(self.topics.requests, self.batch_size)
            await self._fold_batch(batch)

    async def _fold_batch(self, batch: list[tuple[str, bytes]]) -> None:
        events: list[Event] = []
        commands = []
        touched: dict[str, ExecutionState] = {}
        for key, raw in batch:
            try:
                msg = decode_inbound(raw)
            except DecodeError as exc:   # a poison message never blocks the loop
                log.error("dead letter for key %s: %s", key, exc)
                self.dead_letters.append((raw, str(exc)))
                continue
            if msg.execution_id in self.final:   # late facts and duplicate starts of a finished execution
                continue
            transition = advance(self.states.get(msg.execution_id), msg)
            if transition.state is None:
                continue
            self.states[msg.execution_id] = transition.state
            touched[msg.execution_id] = transition.state
            events.extend(transition.events)
            commands.extend(transition.commands)
            for request in transition.requests:
                self._publish_inbound(request)
            for timer, due in transition.timers.items():
                self.timers.schedule(msg.execution_id, timer, due)
        if not touched:
            return
        terminal = [eid for eid, state in touched.items() if state.terminal]
        # Durable before any effect (architecture invariant 6). Serialising and writing happen in a thread
        # so the workers keep running meanwhile; this loop is the only writer of these states and waits.
        await asyncio.to_thread(self._persist, events, touched, terminal)
        for command in commands:
            self.bus.publish(self.topics.commands(command.pool), command.execution_id, encode(command))
        for event in events:
            for listener in self._listeners:
                try:
                    listener(event)
                except Exception:   # an observer must never take the fold loop (and every execution) down
                    log.exception("event listener %r failed on event %s", listener, event.event_id)
        for eid in terminal:
            state = self.final[eid] = self.states.pop(eid)
            for future in self._waiters.pop(eid, []):
                if not future.done():
                    future.set_result(state)

    def _persist(self, events: list[Event], touched: dict[str, ExecutionState], terminal: list[str]) -> None:
        snapshots = {eid: state.to_bytes() for eid, state in touched.items()}
        self.store.commit_batch_sync(events, snapshots, terminal)

    async def _worker_loop(self) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        while True:
            for _key, raw in await self.bus.take(self.topics.commands("default"), self.batch_size):
                try:
                    command = decode_command(raw)
                except DecodeError as exc:
                    log.error("dead letter command: %s", exc)
                    self.dead_letters.append((raw, str(exc)))
                    continue
                await slots.acquire()
                task = asyncio.create_task(execute(command, self.ports))
                self._running.add(task)
                task.add_done_callback(lambda t: (self._running.discard(t), slots.release()))
