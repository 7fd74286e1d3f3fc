"""Forged facts, given/when/then over messages (issue 9 scope 4): every fact about an attempt must carry the
token its command carried; the fold drops (stale, forged) a fact with a missing or wrong token, whatever its
kind, and nothing about the execution changes. Tokens are derived from a random per-execution key, never from
ids alone, and never appear in an event."""
from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from noetl_common.attempt_tokens import MAX_TOKEN, attempt_token, genuine
from noetl_common.batch import fold_batch
from noetl_common.codec import encode
from noetl_common.engine import advance
from noetl_common.messages import (ActionCompleted, ActionFailed, ActionHeartbeat, ActionStarted, ChildFinished,
                                   ChildStarted, StartExecution)
from noetl_common.simulate import Outcome, Simulation, child_id, sim_key
from noetl_common.state_access import TableStates

T0 = 1_000.0
KEY = "k" * 43


def pb(body: str, name: str = "t") -> dict:
    doc = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": name, "path": name}}
    doc.update(yaml.safe_load(body))
    return doc


ONE_STEP = pb("""
workflow:
  - step: start
    next: [{step: a}]
  - step: a
    type: python
    code: "def main(): return 1"
    next: [{step: end}]
  - step: end
""")

PARENT = pb("""
workflow:
  - step: start
    next: [{step: call}]
  - step: call
    type: playbook
    path: child
    next: [{step: end}]
  - step: end
""", "parent")
CHILD = pb("""
workflow:
  - step: start
    next: [{step: end}]
  - step: end
    result: {ok: true}
""", "child")


def started(key: str | None = KEY, eid: str = "e1"):
    """Given an execution whose step `a` was sent to a worker: (state, the command)."""
    t = advance(None, StartExecution(execution_id=eid, time=T0, playbook=ONE_STEP, path="t", fact_key=key))
    (command,) = t.commands
    return t.state, command


def facts(eid: str, cid: str, token: str | None) -> list:
    """One fact of every kind a worker (or a child's fold) sends about an attempt."""
    return [
        ActionStarted(execution_id=eid, command_id=cid, time=T0 + 1, token=token),
        ActionHeartbeat(execution_id=eid, command_id=cid, time=T0 + 2, token=token),
        ActionCompleted(execution_id=eid, command_id=cid, time=T0 + 3, result={"forged": True}, token=token),
        ActionFailed(execution_id=eid, command_id=cid, time=T0 + 3, error="forged", token=token),
        ChildStarted(execution_id=eid, command_id=cid, child_execution_id="x", time=T0 + 3, token=token),
        ChildFinished(execution_id=eid, command_id=cid, child_execution_id="x", status="COMPLETED",
                      result={"forged": True}, time=T0 + 3, token=token),
    ]


def test_a_command_carries_a_token_derived_from_the_key_and_its_id():
    state, command = started()
    assert command.token == attempt_token(KEY, command.command_id)
    assert len(command.token) == 43                     # 256 bits, URL-safe base64
    _, other = started(key="another-key-of-enough-length")
    assert other.command_id == command.command_id and other.token != command.token   # not derivable from ids


@pytest.mark.parametrize("token", [None, "", "wrong", "x" * 43, attempt_token("k" * 42 + "K", "e1:a:1:1"),
                                   attempt_token(KEY, "e1:a:1:2"), attempt_token(KEY, "e2:a:1:1"),
                                   "é" * 43, "\x00" * 43, " " * 43])
@pytest.mark.parametrize("kind", range(6))
def test_a_fact_without_its_attempts_token_is_dropped_whatever_its_kind(token, kind):
    # given a running attempt
    state, command = started()
    before = state.model_dump_json()
    # when a fact about it arrives with a missing or wrong token (another attempt's, another execution's)
    fact = facts("e1", command.command_id, token)[kind]
    t = advance(state, fact)
    # then it is dropped as stale and forged, and nothing changed
    assert (t.stale, t.forged) == (True, True)
    assert (t.events, t.commands, t.requests, t.timers) == ([], [], [], {})
    assert t.state.model_dump_json() == before


def test_a_forged_completion_does_not_complete_the_step_and_the_genuine_one_still_does():
    # given a running attempt
    state, command = started()
    # when a forged completion arrives first
    t = advance(state, ActionCompleted(execution_id="e1", command_id=command.command_id, time=T0 + 1,
                                       result={"forged": True}))
    assert t.forged and t.state.steps["a"].status == "running" and "a" not in t.state.results
    # then the worker's own completion, with the token, completes the step with its result
    t = advance(t.state, ActionCompleted(execution_id="e1", command_id=command.command_id, time=T0 + 2,
                                         result=1, token=command.token))
    assert not t.stale and not t.forged
    assert t.state.status == "COMPLETED" and t.state.results["a"] == 1


def test_the_genuine_token_is_accepted_for_every_worker_fact():
    state, command = started()
    started_, beat, completed, _failed, _child, _finished = facts("e1", command.command_id, command.token)
    for fact in (started_, beat, completed):
        t = advance(state, fact)
        assert not t.stale and not t.forged
        state = t.state
    assert state.status == "COMPLETED" and state.results["a"] == {"forged": True}   # the worker's result
    state, command = started()
    t = advance(state, facts("e1", command.command_id, command.token)[3])
    assert not t.forged and t.state.steps["a"].status == "failed"


def test_an_execution_started_without_a_key_accepts_facts_without_a_token():
    """Executions started by a version before tokens (their snapshots have no key) keep running."""
    state, command = started(key=None)
    assert command.token is None
    t = advance(state, ActionCompleted(execution_id="e1", command_id=command.command_id, time=T0 + 1, result=1))
    assert not t.forged and t.state.status == "COMPLETED"


def test_the_key_and_the_tokens_never_appear_in_an_event():
    sim = Simulation(lambda c: Outcome(result={"n": 1}), now=T0)
    sim.catalog["child"] = CHILD
    sim.start(PARENT)
    sim.run()
    assert sim.state().status == "COMPLETED"
    log = json.dumps([e.model_dump(mode="json") for e in sim.events])
    secrets = [sim_key("e1"), sim_key(child_id("e1:call:1:1"))] + [c.token for c in sim.commands]
    assert all(s and s not in log for s in secrets)


def test_a_child_reports_to_its_parent_with_the_token_of_the_command_that_started_it():
    # given a parent waiting for its child, and the child's fold at its end
    sim = Simulation(lambda c: Outcome(result=1), now=T0)
    sim.catalog["child"] = CHILD
    sim.start(PARENT)
    sim.run()
    parent, child = sim.state("e1"), sim.state(child_id("e1:call:1:1"))
    (call,) = [c for c in sim.commands if c.step == "call"]
    assert child.parent_token == call.token and child.fact_key == sim_key(child.execution_id)
    assert parent.status == "COMPLETED" and parent.results["call"] == {"ok": True}
    assert sim.stale == 0   # nothing was dropped on the way


def test_a_forged_child_finished_does_not_finish_the_parents_step():
    sim = Simulation(lambda c: Outcome(result=1), now=T0)
    sim.catalog["child"] = CHILD
    sim.start(PARENT)
    # deliver until the parent waits for its child, without letting the child run
    while sim.inbox and not any(isinstance(m, ChildStarted) for m in sim.inbox[:1]):
        sim.deliver(sim.inbox.pop(0))
    sim.deliver(sim.inbox.pop(0))   # ChildStarted (genuine)
    parent = sim.state("e1")
    assert parent.steps["call"].status == "running"
    t = advance(parent, ChildFinished(execution_id="e1", command_id="e1:call:1:1", child_execution_id="x",
                                      status="COMPLETED", result={"forged": True}, time=T0 + 5,
                                      token=attempt_token("guess", "e1:call:1:1")))
    assert t.forged and t.state.steps["call"].status == "running"


def test_the_batch_fold_counts_forged_facts():
    state, command = started()
    states = TableStates({"e1": state.to_bytes()})
    forged = [encode(f) for f in facts("e1", command.command_id, "nope")]
    out = fold_batch(states, forged, now=T0 + 5)
    assert (out.folded, out.stale, out.forged) == (6, 6, 6)
    assert not out.events and not out.commands and not out.dead_letters


def test_hostile_tokens_are_refused_by_the_schema_or_dropped_by_the_fold():
    with pytest.raises(ValidationError):
        ActionCompleted(execution_id="e1", command_id="c", time=T0, token="x" * (MAX_TOKEN + 1))
    with pytest.raises(ValidationError):
        ActionCompleted(execution_id="e1", command_id="c", time=T0, token=123)
    with pytest.raises(ValidationError):   # a lone surrogate never reaches the fold
        ActionCompleted(execution_id="e1", command_id="c", time=T0, token="\udcff" * 10)
    with pytest.raises(ValidationError):
        StartExecution(execution_id="e", time=T0, playbook={}, path="p", fact_key="short")
    assert not genuine(KEY, "c", "\x00" * 43)
    assert not genuine(KEY, "c", attempt_token(KEY, "c") + " ")
    assert genuine(KEY, "c", attempt_token(KEY, "c"))


def test_the_fold_is_deterministic_given_the_key():
    a, ca = started()
    b, cb = started()
    assert ca == cb and a.model_dump_json() == b.model_dump_json()
