"""noetl_common.batch.fold_batch, the batch fold of both runtimes: what happens when folding one execution's
message goes wrong in ways the fold does not foresee. The failures are injected (advance, fail_on_error and
quarantine patched to misbehave), since correct inputs no longer make the real fold raise; the tests check
that only that execution is touched, how it ends, and what the batch returns."""
from __future__ import annotations

import json
from typing import Any

import pytest

import noetl_common.batch as batch
from noetl_common.batch import Record, fold_batch
from noetl_common.state_access import StateCache, TableStates
from noetl_common.codec import decode_inbound, encode
from noetl_common.engine import Transition, advance
from noetl_common.messages import (ActionCompleted, ActionStarted, ChildStarted, DeadLetter, Event,
                                   StartExecution)
from noetl_common.state import ExecutionState

T0 = 1_700_000_000.0


def chain(name: str, steps: int = 2) -> dict[str, Any]:
    names = [f"s{i}" for i in range(steps)]
    workflow: list[dict[str, Any]] = [{"step": "start", "next": [{"step": names[0]}]}]
    for i, step in enumerate(names):
        workflow.append({"step": step, "type": "python", "code": "def main():\n    return 1\n",
                         "next": [{"step": names[i + 1] if i + 1 < steps else "end"}]})
    workflow.append({"step": "end"})
    return {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": name, "path": f"t/{name}"},
            "workflow": workflow}


def start(eid: str, document: dict[str, Any] | None = None, **extra: Any) -> StartExecution:
    return StartExecution(execution_id=eid, time=T0, playbook=document or chain(eid), path=f"t/{eid}", **extra)


def done(command: Any, result: Any = 1) -> list[Any]:
    return [ActionStarted(execution_id=command.execution_id, command_id=command.command_id, time=T0 + 1),
            ActionCompleted(execution_id=command.execution_id, command_id=command.command_id, time=T0 + 1,
                            result=result)]


class Table:
    """The broker's shape: a table of snapshots, written by the caller after the batch."""

    def __init__(self) -> None:
        self.rows: dict[str, bytes] = {}
        self.states = TableStates(self.rows, StateCache())

    def fold(self, messages: list[Any]) -> batch.BatchOutput:
        out = fold_batch(self.states, [Record(encode(m), m.execution_id.encode()) if not isinstance(m, bytes)
                                       else m for m in messages], now=T0 + 99)
        self.rows.update(out.states)
        for raw in out.event_bytes + out.command_bytes + out.request_bytes:
            json.loads(raw)                           # every effect comes out encoded
        return out

    def state(self, eid: str) -> ExecutionState:
        return ExecutionState.from_bytes(self.rows[eid])


def kinds(out: batch.BatchOutput, eid: str) -> list[str]:
    return [e.event_type for e in out.events if e.execution_id == eid]


@pytest.fixture
def table() -> Table:
    return Table()


def patch_advance(monkeypatch: Any, misbehave: Any) -> None:
    real = batch.advance

    def patched(state: Any, msg: Any, caps: Any) -> Any:   # the batch passes the runtime's caps on
        return misbehave(state, msg, lambda s, m: real(s, m, caps))
    monkeypatch.setattr(batch, "advance", patched)


# ------------------------------------------------------------------------------------------ advance raises
def test_an_exception_in_advance_fails_that_execution_from_its_clean_state(table: Table, monkeypatch: Any) -> None:
    first = table.fold([start("a"), start("b")])
    cmd_a, cmd_b = first.commands

    def boom(state: Any, msg: Any, real: Any) -> Any:
        if msg.execution_id == "a" and isinstance(msg, ActionCompleted):
            state.workload["half"] = "mutated"
            raise ZeroDivisionError("division by zero")
        return real(state, msg)
    patch_advance(monkeypatch, boom)
    out = table.fold([*done(cmd_a), *done(cmd_b)])
    assert kinds(out, "a") == ["action_started", "execution_failed"]   # the message before it still counts
    failed = [e for e in out.events if e.execution_id == "a"][-1]
    assert failed.error == f"message 'action_completed' of command {cmd_a.command_id} could not be folded: " \
                           f"ZeroDivisionError: division by zero"
    state = table.state("a")
    assert state.status == "FAILED" and "half" not in state.workload and state.steps["s0"].status == "running"
    assert kinds(out, "b")[-2:] == ["step_completed", "step_started"] and table.state("b").status == "RUNNING"
    assert not out.dead_letters and [(f.execution_id, f.quarantined) for f in out.failures] == [("a", False)]
    assert "ZeroDivisionError" in out.failures[0].trace
    assert out.terminal == {"a"}
    # later messages for it are stale, as for any finished execution
    monkeypatch.undo()
    again = table.fold(done(cmd_a))
    assert again.stale == 2 and not again.events and not again.states


def test_a_failed_child_tells_its_parent_and_a_failed_parent_cancels_its_child(table: Table,
                                                                             monkeypatch: Any) -> None:
    parent = start("p", {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "p", "path": "t/p"},
                         "workflow": [{"step": "start", "next": [{"step": "call"}]},
                                      {"step": "call", "type": "playbook", "path": "t/kid", "next": [{"step": "end"}]},
                                      {"step": "end"}]})
    (call,) = table.fold([parent]).commands
    kid = start("kid", parent_execution_id="p", parent_command_id=call.command_id, parent_step="call")
    out = table.fold([ActionStarted(execution_id="p", command_id=call.command_id, time=T0), kid,
                      ChildStarted(execution_id="p", command_id=call.command_id, child_execution_id="kid", time=T0)])
    (kid_cmd,) = out.commands

    def boom(state: Any, msg: Any, real: Any) -> Any:
        if isinstance(msg, ActionCompleted):
            raise RuntimeError("kaput")
        return real(state, msg)
    patch_advance(monkeypatch, boom)
    out = table.fold([ActionCompleted(execution_id="kid", command_id=kid_cmd.command_id, time=T0)])
    (told,) = out.requests
    assert told.kind == "child_finished" and told.execution_id == "p" and told.status == "FAILED"
    assert "RuntimeError: kaput" in told.error and decode_inbound(out.request_bytes[0]) == told

    # and the other way round: the parent fails while its child runs
    (call2,) = Table().fold([start("p2", {**parent.playbook})]).commands   # a fresh parent, its own table
    t = Table()
    t.fold([start("p2", parent.playbook)])
    t.fold([ChildStarted(execution_id="p2", command_id=call2.command_id, child_execution_id="kid2", time=T0)])
    out = t.fold([ActionCompleted(execution_id="p2", command_id=call2.command_id, time=T0)])
    (cancel,) = out.requests
    assert cancel.kind == "cancel" and cancel.execution_id == "kid2" and "kaput" in cancel.reason


# ------------------------------------------------------------------------------------------ encoding fails
def test_an_effect_that_cannot_be_encoded_fails_its_execution(table: Table, monkeypatch: Any) -> None:
    (cmd,) = table.fold([start("a")]).commands

    def unencodable(state: Any, msg: Any, real: Any) -> Any:
        transition = real(state, msg)
        if isinstance(msg, ActionCompleted):
            bad = transition.events[0].model_copy(update={"result": object()})
            return Transition(transition.state, [bad, *transition.events[1:]], transition.commands)
        return transition
    patch_advance(monkeypatch, unencodable)
    out = table.fold(done(cmd))
    assert kinds(out, "a") == ["action_started", "execution_failed"]
    assert "could not be folded: PydanticSerializationError" in out.events[-1].error
    assert table.state("a").status == "FAILED" and not out.commands


def test_a_snapshot_that_cannot_be_encoded_fails_the_execution_at_the_message_that_did_it(
        table: Table, monkeypatch: Any) -> None:
    (cmd,) = table.fold([start("a")]).commands

    def poison(state: Any, msg: Any, real: Any) -> Any:
        transition = real(state, msg)
        if isinstance(msg, ActionCompleted) and msg.execution_id == "a":
            transition.state.variables["bad"] = "\ud800"          # no JSON writer takes a lone surrogate
        return transition
    patch_advance(monkeypatch, poison)
    out = table.fold([*done(cmd), start("b")])
    # action_started folded fine and keeps its event; action_completed's effects (its step_completed and the
    # next step's command) are dropped: the execution fails at that message, from the state before it
    assert kinds(out, "a") == ["action_started", "execution_failed"]
    failed = [e for e in out.events if e.execution_id == "a"][-1]
    assert failed.error.startswith(f"its state could not be saved after message 'action_completed' of "
                                   f"command {cmd.command_id}: PydanticSerializationError")
    assert [c.execution_id for c in out.commands] == ["b"]
    state = table.state("a")
    assert state.status == "FAILED" and "bad" not in state.variables
    assert table.state("b").status == "RUNNING" and not out.dead_letters


# ------------------------------------------------------------------------------------------ quarantine
def test_an_unreadable_snapshot_quarantines_its_execution(table: Table) -> None:
    table.fold([start("b")])
    table.rows["q"] = json.dumps({"execution_id": "q", "status": "RUNNING", "seq": 4, "path": "t/q",
                                  "parent_execution_id": "p", "parent_command_id": "p:call:1:1",
                                  "playbook": {"metadata": {"name": "queue"}},
                                  "work": {"q:x:1:1": {"child_execution_id": "q-child"}},
                                  "steps": ["not", "a", "mapping"]}).encode()
    fact = ActionCompleted(execution_id="q", command_id="q:x:1:1", time=T0 + 5)
    (cmd_b,) = Table().fold([start("b")]).commands
    out = table.fold([fact, *done(cmd_b), fact])
    (event,) = [e for e in out.events if e.execution_id == "q"]
    assert (event.event_type, event.seq, event.event_id, event.node_name) == ("execution_failed", 4, "q:4", "queue")
    assert event.meta == {"quarantined": True} and event.error.startswith("quarantined: its state cannot be read")
    (letter, *rest) = out.dead_letters
    assert not rest                                   # the second fact is simply stale now
    assert letter.original_value() == encode(fact) and letter.reason.startswith("execution q quarantined:")
    assert {(r.kind, r.execution_id) for r in out.requests} == {("cancel", "q-child"), ("child_finished", "p")}
    state = table.state("q")
    assert state.status == "FAILED" and state.seq == 5 and state.error == event.error
    assert [(f.execution_id, f.quarantined) for f in out.failures] == [("q", True)]
    assert table.state("b").steps["s0"].status == "completed"     # the other execution folded on


@pytest.mark.parametrize("garbage", [b"\xff\xfe not even text", b"[1, 2]", b'{"seq": "x", "started": 1e999}'])
def test_a_quarantine_salvages_what_it_can_from_any_snapshot(table: Table, garbage: bytes) -> None:
    table.rows["q"] = garbage
    out = table.fold([ActionStarted(execution_id="q", command_id="c", time=T0)])
    (event,) = out.events
    assert event.event_id == "q:quarantined" and event.meta == {"quarantined": True}
    assert table.state("q").status == "FAILED" and not out.requests


def test_when_failing_an_execution_raises_it_is_quarantined(table: Table, monkeypatch: Any) -> None:
    (cmd,) = table.fold([start("a")]).commands

    def boom(state: Any, msg: Any, real: Any) -> Any:
        if isinstance(msg, ActionCompleted):
            raise RuntimeError("first")
        return real(state, msg)
    patch_advance(monkeypatch, boom)
    monkeypatch.setattr(batch, "fail_on_error", lambda *a: (_ for _ in ()).throw(KeyError("second")))
    out = table.fold(done(cmd))
    (event,) = out.events                           # action_started's event is superseded by the quarantine
    assert event.meta == {"quarantined": True} and event.seq == table.state("a").seq - 1
    assert "RuntimeError: first" in event.error and "KeyError: 'second'" in event.error
    assert [d.reason.split(":")[0] for d in out.dead_letters] == ["execution a quarantined"]


def test_when_not_even_a_quarantine_can_be_written_the_batch_still_goes_on(table: Table, monkeypatch: Any) -> None:
    (cmd,) = table.fold([start("a")]).commands
    before = table.rows["a"]
    table.rows["a"] = b"garbage"
    monkeypatch.setattr(batch, "quarantine", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")))
    out = table.fold([*done(cmd), start("b")])
    assert "a" not in out.states and table.rows["a"] == b"garbage" and before != b"garbage"
    assert [d.reason.split(":")[0] for d in out.dead_letters] == ["execution a quarantined",
                                                                   "execution a could not be quarantined; see the "
                                                                   "earlier dead letter"]
    assert kinds(out, "b")[0] == "execution_start"


# ------------------------------------------------------------------------------------------ what stays the same
def test_garbage_misrouted_and_late_records_are_dead_letters_and_the_rest_folds(table: Table) -> None:
    s = start("a")
    out = fold_batch(table.states, [Record(b"{garbage", b"a", "req", 0, 1), Record(None, b"a", "req", 0, 2),
                                    Record(encode(s), b"other", "req", 0, 3), Record(encode(s), b"a", "req", 0, 4)],
                     now=T0)
    assert [d.reason.split(":")[0] for d in out.dead_letters] == ["invalid message", "undecodable message",
                                                                   "misrouted message"]
    assert [d.source_offset for d in out.dead_letters] == [1, 2, 3]
    assert all(isinstance(d, DeadLetter) for d in out.dead_letters) and kinds(out, "a")[0] == "execution_start"


def test_the_embedded_shape_bare_bytes_and_parsed_states_kept_in_memory() -> None:
    """The embedded runtime's States: parsed states in a dict, no parse and no snapshot read unless something
    goes wrong."""
    class Memory:
        def __init__(self) -> None:
            self.states: dict[str, ExecutionState] = {}
            self.reads = 0

        def take(self, eid: str) -> ExecutionState | None:
            return self.states.get(eid)

        def snapshot(self, eid: str) -> bytes | None:
            self.reads += 1
            return None

        def give_back(self, eid: str, raw: bytes | None, state: ExecutionState | None) -> None:
            if state is None:
                self.states.pop(eid, None)
            else:
                self.states[eid] = state
    memory = Memory()
    out = fold_batch(memory, [encode(start("a"))], now=T0)
    (cmd,) = out.commands
    live = memory.states["a"]
    out = fold_batch(memory, [encode(m) for m in done(cmd)], now=T0)
    assert memory.states["a"] is live and memory.reads == 0 and set(out.states) == {"a"}
    # the deadlines the batch set (the embedded timer loop schedules them; a cleared one fires stale)
    assert out.deadlines == [("a", f"lease:{cmd.command_id}", T0 + 1 + 30.0)]
    assert advance(None, start("z")).state is not None


def test_event_ids_and_effects_are_those_of_advance(table: Table) -> None:
    out = table.fold([start("a")])
    assert [Event.model_validate_json(raw) for raw in out.event_bytes] == out.events
    assert out.partitions == {"a": None} and out.timers == {"a": {}}


@pytest.mark.parametrize("when", ["NaN", "Infinity", "1e300", "-1"])
def test_a_message_with_an_impossible_time_is_a_dead_letter_and_changes_nothing(table: Table, when: str) -> None:
    """The fold stamps events with a message's time: NaN or 1e300 used to make even the quarantine fail."""
    (cmd,) = table.fold([start("a")]).commands
    before = table.rows["a"]
    raw = ('{"kind": "action_started", "execution_id": "a", "command_id": "%s", "time": %s}'
           % (cmd.command_id, when)).encode()
    out = table.fold([raw, *done(cmd)])
    assert [d.reason.split(":")[0] for d in out.dead_letters] == ["invalid message"]
    assert kinds(out, "a") == ["action_started", "action_completed", "step_completed", "step_started"]
    assert table.rows["a"] != before and not out.failures
    lease = ('{"kind": "start", "execution_id": "z", "time": 1, "path": "p", "playbook": {}, "lease_seconds": %s}'
             % ("NaN" if when == "NaN" else "-1")).encode()
    assert table.fold([lease]).dead_letters
