"""The broker's batch fold: raw inbound records → advance() per message → everything the batch produced.

No transport imports (no faust, no aiokafka): the agent in `app.py` decodes nothing itself, it hands a
batch of records to `apply_batch`, then sends the outputs and writes the changed states. Unit-testable with
a dict for the table.

`apply_batch` only *reads* the state mapping. The caller writes `BatchOutput.states` after the events,
commands, requests and dead letters are durable (see docs/broker.md, "Commit semantics"): a state must never
be durable ahead of the effects it caused, or a crash in between would lose them for good.
"""
from __future__ import annotations

import base64
import json
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from noetl_common.codec import DecodeError, decode_inbound
from noetl_common.engine import advance
from noetl_common.messages import Command, DeadLetter, Event, StartExecution
from noetl_common.state import ExecutionState

log = logging.getLogger("noetl.broker")


class StateMap(Protocol):
    """What `apply_batch` needs from the table: the snapshot bytes of an execution, or None."""
    def get(self, key: str, default: Any = None) -> Any: ...


@dataclass(frozen=True)
class Record:
    """One inbound Kafka record (requests or results topic), as the agent received it."""
    value: bytes | None
    key: bytes | None = None
    topic: str = ""
    partition: int | None = None
    offset: int | None = None
    timestamp: float | None = None   # the record's Kafka timestamp, epoch seconds (a late re-send shows in it)


@dataclass
class BatchOutput:
    states: dict[str, bytes] = field(default_factory=dict)     # changed snapshots, by execution id
    partitions: dict[str, int | None] = field(default_factory=dict)   # the partition each changed state folds on
    timers: dict[str, dict[str, float]] = field(default_factory=dict)  # post-batch deadlines of changed states
    terminal: set[str] = field(default_factory=set)            # executions that ended in this batch
    finished: dict[str, float] = field(default_factory=dict)  # of those: when (state.finished, epoch s)
    events: list[Event] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)          # inbound messages for other executions' keys
    dead_letters: list[DeadLetter] = field(default_factory=list)
    folded: int = 0                                            # messages that reached advance()
    stale: int = 0                                             # of those, duplicates / out of date


class StateCache:
    """Parsed states kept between batches, so a busy execution is not re-parsed on every batch.

    An entry is used only while the table still holds the very bytes it was parsed from (identity, then
    equality): after a rebalance, a recovery or a batch that failed before its states were written, the
    table's bytes differ and the state is parsed again. Entries are taken out while a batch folds them, so
    a state half-mutated by a failing advance() is never served again.
    """

    def __init__(self, size: int = 20_000) -> None:
        self.size = size
        self._entries: OrderedDict[str, tuple[bytes, ExecutionState]] = OrderedDict()

    def take(self, execution_id: str, raw: bytes | None) -> ExecutionState | None:
        if raw is None:
            self._entries.pop(execution_id, None)
            return None
        entry = self._entries.pop(execution_id, None)
        if entry is not None and (entry[0] is raw or entry[0] == raw):
            return entry[1]
        return ExecutionState.from_bytes(raw)

    def put(self, execution_id: str, raw: bytes, state: ExecutionState) -> None:
        self._entries[execution_id] = (raw, state)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class _Working:
    """One execution while a batch folds it."""
    raw: bytes | None                       # the table's bytes at the start of the batch
    state: ExecutionState | None
    partition: int | None
    was_terminal: bool = False
    changed: bool = False
    done: list[Any] = field(default_factory=list)   # messages folded without error (for a replay after one)


def apply_batch(states: StateMap, messages: Iterable[Record | bytes], *, now: float,
                cache: StateCache | None = None, late_start_after: float | None = None) -> BatchOutput:
    """Fold a batch of inbound records in order. `now` stamps dead letters only (the fold reads no clock).

    `late_start_after` (NOETL_BROKER_EVICT_AFTER): a `start` of an execution the table does not hold, whose
    record was produced more than half this many seconds after the request's `time`, is a re-send of a request
    whose execution may have been evicted: it is dead-lettered instead of started (see eviction.py).

    Per record: decode (a DecodeError, a key that is not the execution id, or an exception in the fold
    becomes a dead letter with the reason; the batch goes on), advance() against the execution's latest state
    (the table's, or this batch's own), collect the outputs. A state counts as changed when a message was not
    stale or produced anything; only changed states are serialised (once per batch).
    """
    out = BatchOutput()
    working: dict[str, _Working] = {}
    cache = cache if cache is not None else StateCache(0)
    for item in messages:
        record = item if isinstance(item, Record) else Record(value=item)
        try:
            msg = _decode(record, check_key=isinstance(item, Record))
        except DecodeError as exc:
            out.dead_letters.append(dead_letter(record, str(exc), now))
            continue
        eid = msg.execution_id
        work = working.get(eid)
        if work is None:
            raw = states.get(eid)
            if raw is None and late_start_after and _late_start(record, msg, late_start_after):
                out.dead_letters.append(dead_letter(record, (
                    f"late duplicate start: produced {record.timestamp - msg.time:.0f}s after its time, more than "
                    f"half NOETL_BROKER_EVICT_AFTER ({late_start_after / 2:g}s), for an execution the broker does not "
                    f"hold (finished and evicted, or never started): not started again"), now))
                continue
            state = cache.take(eid, raw)
            work = working[eid] = _Working(raw, state, record.partition, state is not None and state.terminal)
        try:
            transition = advance(work.state, msg)
        except Exception as exc:   # a bug in the fold must not stop the partition: dead-letter and go on
            log.exception("fold failed for execution %s on %s", eid, type(msg).__name__)
            out.dead_letters.append(dead_letter(record, f"fold error: {type(exc).__name__}: {exc}", now))
            work.state = _replay(work)
            continue
        out.folded += 1
        out.stale += transition.stale
        work.done.append(msg)
        if transition.state is not None:
            work.state = transition.state
        if not transition.stale or transition.events or transition.commands or transition.requests:
            work.changed = True
        out.events.extend(transition.events)
        out.commands.extend(transition.commands)
        out.requests.extend(transition.requests)
    for eid, work in working.items():
        state = work.state
        if state is None:
            continue
        if not work.changed:
            if work.raw is not None:
                cache.put(eid, work.raw, state)
            continue
        raw = state.to_bytes()
        cache.put(eid, raw, state)
        out.states[eid] = raw
        out.partitions[eid] = work.partition
        out.timers[eid] = {} if state.terminal else dict(state.timers)
        if state.terminal and not work.was_terminal:
            out.terminal.add(eid)
            out.finished[eid] = state.finished if state.finished is not None else now
    return out


def _late_start(record: Record, msg: Any, evict_after: float) -> bool:
    """Refused past HALF the eviction grace: a re-send produced just before its execution's eviction may be
    folded just after it (consumer lag, a rebalance, the eviction ticker), so the two windows must not meet.
    A re-send then restarts an execution only if it waits in the topic longer than half the grace."""
    return (isinstance(msg, StartExecution) and record.timestamp is not None
            and record.timestamp - msg.time > evict_after / 2)


def _decode(record: Record, check_key: bool) -> Any:
    if record.value is None:
        raise DecodeError("undecodable message: the record has no value (a tombstone)")
    msg = decode_inbound(record.value)
    if check_key:
        # One writer per execution (§2.1) needs every message of an execution on its partition: a record
        # keyed otherwise would be folded against the wrong partition's table, so it is refused.
        want = msg.execution_id.encode()
        if record.key != want:
            got = "no key" if record.key is None else f"key {record.key[:80]!r}"
            raise DecodeError(f"misrouted message: {got}; the key must be the execution_id {msg.execution_id!r}")
    return msg


def _replay(work: _Working) -> ExecutionState | None:
    """Rebuild a state after advance() raised (it may have half-mutated it): the table's snapshot plus the
    messages of this batch that folded cleanly. Their outputs were collected already and are not repeated."""
    state = None if work.raw is None else ExecutionState.from_bytes(work.raw)
    for msg in work.done:
        transition = advance(state, msg)
        if transition.state is not None:
            state = transition.state
    return state


def dead_letter(record: Record, reason: str, now: float) -> DeadLetter:
    """The noetl.dlq record for an inbound record that cannot be folded: the original bytes and the reason."""
    return DeadLetter(
        source_topic=record.topic, source_partition=record.partition, source_offset=record.offset,
        key=None if record.key is None else base64.b64encode(record.key).decode("ascii"),
        value=base64.b64encode(record.value or b"").decode("ascii"), reason=reason, time=now,
        timestamp=datetime.fromtimestamp(now, timezone.utc).isoformat())


def schedule_of(raw: bytes) -> tuple[dict[str, float], float | None, float]:
    """A snapshot's live deadlines, when it finished (None while it runs) and its lease: one parse, for a
    recovery."""
    data = json.loads(raw)
    lease = float(data.get("lease_seconds") or 0.0)
    if data.get("status") == "RUNNING":
        return {str(key): float(due) for key, due in (data.get("timers") or {}).items()}, None, lease
    finished = data.get("finished")
    return {}, float(finished if finished is not None else data.get("started") or 0.0), lease
