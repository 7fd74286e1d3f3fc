"""The batch fold, one function for both runtimes: inbound records → advance() per message → everything the
batch produced, already encoded. The broker (a faust Table of snapshots, Kafka) and the embedded runtime
(parsed states in memory, SQLite) call the same `fold_batch`; only their `States` (state_access.py) differ.

Failure model (docs/broker.md and docs/embedded.md, "Failure model"): one execution's message can never stop
the batch, nor harm another execution.

- A record that does not decode, is keyed for another execution, or re-sends a start long after its time:
  a dead letter with the reason; the batch goes on.
- Anything that raises while one execution's message is folded (advance, an event or a command that cannot
  be encoded, a snapshot that cannot be encoded): the execution is rebuilt as it was before that message
  (its last durable snapshot plus the batch's earlier messages, replayed) and failed through the normal
  lifecycle with an `execution_failed` event naming the cause; the batch goes on.
- When even that is impossible (its snapshot cannot be read; failing it raised or cannot be saved): it is
  quarantined (engine/quarantine.py) and the message is dead-lettered with the reason.

Pure: `now` (stamps dead letters and quarantines of messages that carry no time) is an argument. The caller
writes the states of `BatchOutput.states` only after the effects are durable (a state must never be durable
ahead of the effects it caused).
"""
from __future__ import annotations

import base64
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from noetl_common.caps import DEFAULT_CAPS, Caps
from noetl_common.codec import DecodeError, decode_inbound, encode
from noetl_common.engine import Transition, advance, fail_on_error
from noetl_common.engine.quarantine import clean_text, quarantine
from noetl_common.messages import Command, DeadLetter, Event, StartExecution
from noetl_common.state import ExecutionState
from noetl_common.state_access import States

MAX_EPOCH = 253_402_300_799.0   # the last second a timestamp can show (messages.Epoch)


@dataclass(frozen=True)
class Record:
    """One inbound record (a Kafka record of the requests or results topic, or a message of the in-memory bus)."""
    value: bytes | None
    key: bytes | None = None
    topic: str = ""
    partition: int | None = None
    offset: int | None = None
    timestamp: float | None = None   # the record's timestamp, epoch seconds (a late re-send shows in it)


@dataclass
class Failure:
    """An execution this batch failed or quarantined because of an exception: for the runtime's log."""
    execution_id: str
    reason: str
    quarantined: bool
    trace: str = ""


@dataclass
class BatchOutput:
    states: dict[str, bytes] = field(default_factory=dict)     # changed snapshots, by execution id
    # the same snapshots as (everything but the playbook, the playbook member): ExecutionState.snapshot_parts,
    # for a store that keeps the playbook once per execution. Missing for a snapshot a failure path wrote.
    snapshot_parts: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    partitions: dict[str, int | None] = field(default_factory=dict)   # the partition each changed state folds on
    timers: dict[str, dict[str, float]] = field(default_factory=dict)  # post-batch deadlines of changed states
    deadlines: list[tuple[str, str, float]] = field(default_factory=list)   # (execution, key, due) set by the batch
    terminal: set[str] = field(default_factory=set)            # executions that ended in this batch
    finished: dict[str, float] = field(default_factory=dict)  # of those: when (state.finished, epoch s)
    # The effects, each with its encoding (*_bytes[i] encodes the i-th): events and commands in fold order,
    # requests after them, by execution.
    events: list[Event] = field(default_factory=list)
    event_bytes: list[bytes] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    command_bytes: list[bytes] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)          # inbound messages for other executions' keys
    request_bytes: list[bytes] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    folded: int = 0                                            # messages that reached advance()
    stale: int = 0                                             # of those, duplicates / out of date
    forged: int = 0                                            # of the stale: facts without their attempt's token


class _Working:
    """One execution while a batch folds it. Its events, commands and deadlines go straight to the batch's
    output (they carry its id, so a failure path can take them out again); its requests, which are
    addressed to other executions, are kept here until the end of the batch (there are rarely any)."""
    __slots__ = ("state", "partition", "was_terminal", "changed", "dead", "raw", "done", "requests")

    def __init__(self, state: ExecutionState | None, partition: int | None, was_terminal: bool = False) -> None:
        self.state = state
        self.partition = partition
        self.was_terminal = was_terminal
        self.changed = False
        self.dead = False                           # not even a quarantine could be written: nothing is
        self.raw: bytes | None = None               # its snapshot, when a failure path encoded it already
        self.done: list[Any] = []                   # messages folded without error (a replay's input)
        self.requests: list[tuple[Any, bytes]] | None = None


def _add(out: BatchOutput, work: _Working, eid: str, transition: Transition,
         encoded: tuple[list[bytes], list[bytes], list[bytes]]) -> None:
    """Collect one message's effects."""
    if transition.events:
        out.events += transition.events
        out.event_bytes += encoded[0]
    if transition.commands:
        out.commands += transition.commands
        out.command_bytes += encoded[1]
    if transition.requests:
        work.requests = (work.requests or []) + list(zip(transition.requests, encoded[2]))
    if transition.timers:
        out.deadlines += [(eid, key, due) for key, due in transition.timers.items()]


def _drop(out: BatchOutput, work: _Working, eid: str) -> None:
    """Take every effect of this execution in this batch out again (a failure path then decides anew)."""
    keep = [i for i, e in enumerate(out.events) if e.execution_id != eid]
    if len(keep) < len(out.events):
        out.events[:], out.event_bytes[:] = [out.events[i] for i in keep], [out.event_bytes[i] for i in keep]
    keep = [i for i, c in enumerate(out.commands) if c.execution_id != eid]
    if len(keep) < len(out.commands):
        out.commands[:], out.command_bytes[:] = ([out.commands[i] for i in keep],
                                                 [out.command_bytes[i] for i in keep])
    out.deadlines[:] = [d for d in out.deadlines if d[0] != eid]
    work.requests = None


def fold_batch(states: States, messages: Iterable[Record | bytes], *, now: float,
               late_start_after: float | None = None, caps: Caps = DEFAULT_CAPS) -> BatchOutput:
    """Fold a batch of inbound records in order (see the module docstring for what may go wrong).

    A bare `bytes` item is a message of the in-memory bus; a `Record` comes from Kafka and its key must be
    the execution id. `late_start_after` (the broker's NOETL_BROKER_EVICT_AFTER): a `start` of an execution
    the states do not hold, whose record was produced more than half this many seconds after the request's
    `time`, is a re-send of a request whose execution may have been evicted: dead-lettered, not started.
    `caps`: the runtime's caps (noetl_common.caps), recorded by each execution this batch starts.

    A state counts as changed when a message was not stale or produced anything; only changed states are
    encoded (once per batch) and returned."""
    out = BatchOutput()
    working: dict[str, _Working] = {}
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
            try:
                state = states.take(eid)
            except Exception as exc:   # the stored state cannot be read: nothing can fold on it any more
                work = working[eid] = _Working(None, record.partition)
                _quarantine(work, eid, msg, record, f"its state cannot be read: {_why(exc)}", now, out,
                            raw=_snapshot(states, eid), trace=traceback.format_exc())
                continue
            if state is None and late_start_after and _late_start(record, msg, late_start_after):
                out.dead_letters.append(dead_letter(record, (
                    f"late duplicate start: produced {record.timestamp - msg.time:.0f}s after its time, more than "
                    f"half NOETL_BROKER_EVICT_AFTER ({late_start_after / 2:g}s), for an execution the broker does not "
                    f"hold (finished and evicted, or never started): not started again"), now))
                continue
            work = working[eid] = _Working(state, record.partition, state is not None and state.terminal)
        if work.dead:
            out.dead_letters.append(dead_letter(record, f"execution {eid} could not be quarantined; see the "
                                                        f"earlier dead letter", now))
            continue
        try:
            transition = advance(work.state, msg, caps)
            encoded = _encode(transition)
        except Exception as exc:
            _fail(work, eid, msg, record, f"{_what(msg)} could not be folded: {_why(exc)}", now, out, states,
                  traceback.format_exc(), caps)
            continue
        out.folded += 1
        out.stale += transition.stale
        out.forged += transition.forged
        work.done.append(msg)
        if transition.state is not None:
            work.state = transition.state
        if not transition.stale or transition.events or transition.commands or transition.requests:
            work.changed = True
            work.raw = None
        _add(out, work, eid, transition, encoded)
    for eid, work in working.items():
        _finish(eid, work, states, now, out, caps)
    return out


def _finish(eid: str, work: _Working, states: States, now: float, out: BatchOutput, caps: Caps) -> None:
    """Encode a changed state (or fail the execution if it cannot be), give it back, collect its requests."""
    parts = None
    if work.state is not None and work.changed and work.raw is None:
        try:
            split = work.state.snapshot_parts()
            work.raw = ExecutionState.join_snapshot(*split)
            parts = split
        except Exception as exc:
            _unsaveable(eid, work, states, _why(exc), now, out, traceback.format_exc(), caps)
    if work.dead or work.state is None:
        if work.dead:
            _drop(out, work, eid)
        states.give_back(eid, None, None)
        return
    state = work.state
    states.give_back(eid, work.raw if work.changed else None, state)
    if work.requests:
        out.requests += [request for request, _ in work.requests]
        out.request_bytes += [raw for _, raw in work.requests]
    if not work.changed or work.raw is None:
        return
    out.states[eid] = work.raw
    if parts is not None:
        out.snapshot_parts[eid] = parts
    out.partitions[eid] = work.partition
    out.timers[eid] = {} if state.terminal else dict(state.timers)
    if state.terminal and not work.was_terminal:
        out.terminal.add(eid)
        out.finished[eid] = state.finished if state.finished is not None else now


def _fail(work: _Working, eid: str, msg: Any, record: Record, reason: str, now: float, out: BatchOutput,
          states: States, trace: str, caps: Caps, clean: Any = ...) -> None:
    """Fail the execution on `msg`, from its state as it was before `msg` (`clean`, else replayed)."""
    try:
        if clean is ...:
            clean = _replay(_snapshot(states, eid), work.done, caps)
        transition = fail_on_error(clean, msg, clean_text(reason))
        encoded = _encode(transition)
        raw = transition.state.to_bytes() if transition.state is not None else None
    except Exception as exc:
        _quarantine(work, eid, msg, record, f"{reason}; failing it raised {_why(exc)}", now, out,
                    raw=_snapshot(states, eid), trace=trace)
        return
    if transition.state is None:
        if work.state is None:   # nothing to fail: the message had no execution to act on
            out.dead_letters.append(dead_letter(record, reason, now))
            return
        # there was a state, but the replay found none (its snapshot could not be read)
        _quarantine(work, eid, msg, record, f"{reason}; its state could not be rebuilt", now, out,
                    raw=None, trace=trace)
        return
    work.state, work.raw, work.changed = transition.state, raw, True
    _add(out, work, eid, transition, encoded)
    out.failures.append(Failure(eid, reason, False, trace))


def _quarantine(work: _Working, eid: str, msg: Any, record: Record, reason: str, now: float, out: BatchOutput,
                raw: bytes | None, trace: str) -> None:
    if record.key is None:   # a bare message of the in-memory bus: its letter is filed under its execution
        record = replace(record, key=eid.encode())
    out.dead_letters.append(dead_letter(record, clean_text(f"execution {eid} quarantined: {reason}"), now))
    out.failures.append(Failure(eid, reason, True, trace))
    try:
        at = getattr(msg, "time", None)
        transition = quarantine(eid, reason, at if isinstance(at, float) and 0 <= at <= MAX_EPOCH else now,
                                raw=raw, msg=msg)
        encoded = _encode(transition)
        snapshot = transition.state.to_bytes() if transition.state is not None else None
    except Exception:   # cannot happen with the minimal state; if it does, nothing is written for it
        work.state, work.changed, work.dead = None, False, True
        return
    _drop(out, work, eid)   # whatever it did before in this batch is superseded
    work.state, work.raw, work.changed = transition.state, snapshot, True
    _add(out, work, eid, transition, encoded)


def _unsaveable(eid: str, work: _Working, states: States, why: str, now: float, out: BatchOutput,
                trace: str, caps: Caps) -> None:
    """The state after the batch cannot be encoded: find the first message after which it could not be
    (one replay from the snapshot, encoding after each message, collecting the effects again), keep the
    effects of the messages before it and fail the execution on it, from the state before it."""
    snapshot = _snapshot(states, eid)
    done = work.done
    _drop(out, work, eid)
    culprit = len(done) - 1
    try:
        if not done:
            raise RuntimeError("no message of this batch changed it")
        state = None if snapshot is None else ExecutionState.from_bytes(snapshot)
        good = snapshot
        for i, msg in enumerate(done):
            transition = advance(state, msg, caps)
            if transition.state is not None:
                state = transition.state
            try:
                raw = state.to_bytes() if state is not None else None
            except Exception:
                culprit = i
                break
            good = raw
            _add(out, work, eid, transition, _encode(transition))
        clean = None if good is None else ExecutionState.from_bytes(good)
    except Exception as exc:
        msg = done[culprit] if done else None
        record = Record(value=encode(msg) if msg is not None else None, key=eid.encode())
        _quarantine(work, eid, msg, record, f"its state could not be saved ({why}) nor rebuilt ({_why(exc)})",
                    now, out, raw=snapshot, trace=trace)
        return
    msg = done[culprit]
    work.done = done[:culprit]
    work.raw = None
    _fail(work, eid, msg, Record(value=encode(msg), key=eid.encode()),
          f"its state could not be saved after {_what(msg)}: {why}", now, out, states, trace, caps, clean=clean)


def _snapshot(states: States, eid: str) -> bytes | None:
    try:
        return states.snapshot(eid)
    except Exception:   # a store that cannot be read now: the quarantine then salvages nothing from it
        return None


def _replay(raw: bytes | None, done: list[Any], caps: Caps) -> ExecutionState | None:
    """The state as it was after `done` (advance() may have half-mutated the live one before raising): the
    last snapshot plus the batch's messages that folded cleanly."""
    state = None if raw is None else ExecutionState.from_bytes(raw)
    for msg in done:
        transition = advance(state, msg, caps)
        if transition.state is not None:
            state = transition.state
    return state


def _encode(transition: Transition) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """Every effect of one message, encoded now: one that cannot be fails this message, not the batch."""
    return ([*map(encode, transition.events)], [*map(encode, transition.commands)],
            [*map(encode, transition.requests)])


def _what(msg: Any) -> str:
    kind = getattr(msg, "kind", type(msg).__name__)
    command = getattr(msg, "command_id", None)
    return f"message {kind!r}" + (f" of command {command}" if command else "")


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


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


def dead_letter(record: Record, reason: str, now: float) -> DeadLetter:
    """The dead letter for an inbound record that cannot be folded: the original bytes and the reason."""
    return DeadLetter(
        source_topic=record.topic, source_partition=record.partition, source_offset=record.offset,
        key=None if record.key is None else base64.b64encode(record.key).decode("ascii"),
        value=base64.b64encode(record.value or b"").decode("ascii"), reason=clean_text(reason), time=now,
        timestamp=datetime.fromtimestamp(now, timezone.utc).isoformat())
