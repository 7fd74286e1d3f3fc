"""Leases, given/when/then over messages: a lost lease is an infrastructure fault, retried with the same
attempt before the step's own `retry` policy counts; the events say which kind of retry happened."""
from __future__ import annotations

import json
import math

import pytest
import yaml
from pydantic import ValidationError

from noetl_common.codec import DecodeError, decode_inbound, encode
from noetl_common.engine import advance
from noetl_common.engine.leases import infra_retry_delay, recovered_fire_time
from noetl_common.messages import (ActionCompleted, ActionFailed, ActionHeartbeat, ActionStarted, StartExecution,
                                   TimerFired)
from noetl_common.simulate import Outcome, Simulation

T0 = 1_000.0


def pb(body: str) -> dict:
    doc = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "t", "path": "t"}}
    doc.update(yaml.safe_load(body))
    return doc


NO_RETRY = pb("""
workflow:
  - step: start
    next: [{step: a}]
  - step: a
    type: python
    code: "def main(): return 1"
    next: [{step: end}]
  - step: end
""")

POLICY_RETRY = pb("""
workflow:
  - step: start
    next: [{step: a}]
  - step: a
    type: python
    retry: {max_attempts: 2, initial_delay: 0.5, jitter: false}
    code: "def main(): return 1"
    next: [{step: end}]
  - step: end
""")


def hangs_first(n: int):
    """A scripted worker whose first `n` sends of any command vanish (the worker dies after announcing it)."""
    seen: dict[str, int] = {}

    def worker(cmd):
        seen[cmd.command_id] = seen.get(cmd.command_id, 0) + 1
        return Outcome(hang=True) if seen[cmd.command_id] <= n else Outcome(result={"sent": seen[cmd.command_id]})
    return worker


def retries(events, kind=None):
    return [e for e in events if e.event_type == "action_retry" and (kind is None or e.result["kind"] == kind)]


def start(doc=NO_RETRY, eid="e1", **lease):
    lease.setdefault("lease_seconds", 30)
    return advance(None, StartExecution(execution_id=eid, time=T0, playbook=doc, path="t", **lease))


# ---------------------------------------------------------------------------------------- infrastructure retry
def test_a_lost_lease_resends_the_same_attempt_with_backoff_and_the_step_without_retry_completes():
    sim = Simulation(hangs_first(2), now=T0)
    sim.start(NO_RETRY)
    sim.run()
    assert sim.state().status == "COMPLETED" and sim.state().results["a"] == {"sent": 3}
    sends = [c for c in sim.commands if c.step == "a"]
    # the same logical attempt each time: same command id, same attempt number
    assert [(c.command_id, c.attempt) for c in sends] == [("e1:a:1:1", 1)] * 3
    # lease 30 s after each announcement, then 1 s, then 2 s of backoff
    assert [c.time - T0 for c in sends] == [0, 30 + 1, 30 + 1 + 30 + 2]
    infra = retries(sim.events, "infrastructure")
    assert [(e.attempt, e.result["infra_retry"], e.result["delay"], e.result["reason"]) for e in infra] == [
        (1, 1, 1.0, "lease_expired"), (1, 2, 2.0, "lease_expired")]
    assert all(e.result["next_attempt"] == 1 and e.result["infra_retries"] == 3 for e in infra)
    assert infra[0].error == "worker lease expired: no heartbeat for 30s"
    assert not [e for e in sim.events if e.event_type == "action_error"]     # the attempt never failed
    assert sim.log().count("action_started:a") == 3 and sim.log().count("action_completed:a") == 1


def test_exhausted_infrastructure_retries_fail_a_step_without_retry_and_name_the_sends():
    sim = Simulation(hangs_first(99), now=T0)
    sim.start(NO_RETRY)
    sim.run()
    state = sim.state()
    assert state.status == "FAILED"
    assert [e.result["delay"] for e in retries(sim.events)] == [1.0, 2.0, 4.0]
    (error,) = [e for e in sim.events if e.event_type == "action_error"]
    assert error.error == "worker lease expired: no heartbeat for 30s (the attempt was sent 4 times)"
    assert error.time - T0 == 4 * 30 + 1 + 2 + 4 and error.worker_id is None
    assert "the attempt was sent 4 times" in state.error and not state.timers and not state.work


def test_after_exhaustion_the_policy_retry_counts_with_a_fresh_infrastructure_budget():
    sent: dict[str, int] = {}

    def worker(cmd):   # attempt 1: all 4 sends lost; attempt 2: 3 lost, the 4th completes
        sent[cmd.command_id] = sent.get(cmd.command_id, 0) + 1
        return Outcome(hang=True) if cmd.attempt == 1 or sent[cmd.command_id] <= 3 else Outcome(result=2)
    sim = Simulation(worker, now=T0)
    sim.start(POLICY_RETRY)
    sim.run()
    assert sim.state().status == "COMPLETED" and sim.state().results["a"] == 2
    kinds = [(e.event_type, e.attempt, (e.result or {}).get("kind")) for e in sim.events
             if e.event_type in ("action_retry", "action_error")]
    assert kinds == [("action_retry", 1, "infrastructure")] * 3 + [
        ("action_error", 1, None), ("action_retry", 1, "policy")] + [("action_retry", 2, "infrastructure")] * 3
    policy = retries(sim.events, "policy")[0]
    assert policy.result == {"attempt": 1, "next_attempt": 2, "delay": 0.5, "kind": "policy"}
    assert sent == {"e1:a:1:1": 4, "e1:a:1:2": 4}


def test_lease_retries_zero_restores_the_immediate_policy_failure():
    sim = Simulation(hangs_first(1), now=T0)
    sim.inbox.append(StartExecution(execution_id="e1", time=T0, playbook=NO_RETRY, path="t", lease_retries=0))
    sim.run()
    assert sim.state().status == "FAILED" and not retries(sim.events)
    assert sim.state().error == "step 'a' failed: worker lease expired: no heartbeat for 30s"


def test_the_settings_on_the_start_message_set_count_and_backoff():
    sim = Simulation(hangs_first(99), now=T0)
    sim.inbox.append(StartExecution(execution_id="e1", time=T0, playbook=NO_RETRY, path="t", lease_seconds=5,
                                    lease_retries=5, lease_retry_delay=0.25))
    sim.run()
    assert [e.result["delay"] for e in retries(sim.events)] == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert sim.state().status == "FAILED"
    assert infra_retry_delay(10, 20) == 60.0 and infra_retry_delay(100, 3) == 100   # capped, never below base


def test_a_step_timeout_reported_by_the_worker_is_the_steps_failure_not_infrastructure():
    doc = pb("""
workflow:
  - step: start
    next: [{step: a}]
  - step: a
    type: python
    timeout: 2
    code: "def main(): return 1"
  - step: end
""")
    sim = Simulation(lambda cmd: Outcome(ok=False, error="timed out after 2s"), now=T0)
    sim.start(doc)
    sim.run()
    assert sim.state().status == "FAILED" and not retries(sim.events)
    assert [c.command_id for c in sim.commands] == ["e1:a:1:1"]


def test_an_iteration_whose_worker_vanished_is_resent_with_its_own_command_id():
    doc = pb("""
workload: {items: [1, 2, 3]}
workflow:
  - step: start
    next: [{step: each}]
  - step: each
    type: iterator
    collection: "{{ workload.items }}"
    element: n
    task:
      type: python
      data: {n: "{{ n }}"}
      code: "def main(n): return n"
    next: [{step: end}]
  - step: end
    result: "{{ each }}"
""")
    sent: dict[str, int] = {}

    def worker(cmd):
        sent[cmd.command_id] = sent.get(cmd.command_id, 0) + 1
        if cmd.index == 1 and sent[cmd.command_id] == 1:
            return Outcome(hang=True)
        return Outcome(result=cmd.action.data["n"] * 10)
    sim = Simulation(worker, now=T0)
    sim.start(doc)
    sim.run()
    assert sim.state().status == "COMPLETED" and sim.state().result == [10, 20, 30]
    assert sent == {"e1:each:1:1:0": 1, "e1:each:1:1:1": 2, "e1:each:1:1:2": 1}
    (infra,) = retries(sim.events, "infrastructure")
    assert infra.current_index == 1 and infra.attempt == 1


# ---------------------------------------------------------------------------------- late and stale facts
def _lost(doc=NO_RETRY):
    """Given attempt 1 announced at T0 + 1 and its lease expired at T0 + 31 (re-send due at T0 + 32)."""
    t = start(doc)
    t = advance(t.state, ActionStarted(execution_id="e1", command_id="e1:a:1:1", time=T0 + 1, worker_id="w1"))
    t = advance(t.state, TimerFired(execution_id="e1", timer="lease:e1:a:1:1", time=T0 + 31))
    assert [e.event_type for e in t.events] == ["action_retry"] and not t.commands
    assert t.state.timers == {"resend:e1:a:1:1": T0 + 32}
    return t.state


def test_the_lost_attempts_own_late_result_is_accepted_and_no_resend_happens():
    state = _lost()
    t = advance(state, ActionCompleted(execution_id="e1", command_id="e1:a:1:1", time=T0 + 31.5, result=7,
                                       worker_id="w1"))
    assert t.state.results["a"] == 7 and t.state.status == "COMPLETED"
    assert [e.event_type for e in t.events][:2] == ["action_started", "action_completed"]  # re-announced
    assert not t.state.timers
    late = advance(t.state, TimerFired(execution_id="e1", timer="resend:e1:a:1:1", time=T0 + 32))
    assert late.stale and not late.commands and not late.events


def test_after_the_resend_the_first_report_wins_and_the_second_is_stale():
    state = _lost()
    t = advance(state, TimerFired(execution_id="e1", timer="resend:e1:a:1:1", time=T0 + 32))
    (cmd,) = t.commands
    assert (cmd.command_id, cmd.attempt, cmd.time) == ("e1:a:1:1", 1, T0 + 32)
    assert t.state.work["e1:a:1:1"].infra_retries == 1 and t.state.work["e1:a:1:1"].started is None
    # the "lost" worker was alive after all: its heartbeat extends nothing (no lease until an announcement)
    beat = advance(t.state, ActionHeartbeat(execution_id="e1", command_id="e1:a:1:1", time=T0 + 33))
    assert not beat.events and not t.state.timers
    first = advance(t.state, ActionCompleted(execution_id="e1", command_id="e1:a:1:1", time=T0 + 34, result=1))
    assert first.state.status == "COMPLETED" and first.state.results["a"] == 1
    before = first.state.model_dump_json()
    second = advance(first.state, ActionCompleted(execution_id="e1", command_id="e1:a:1:1", time=T0 + 35,
                                                  result=2))
    assert second.stale and not second.events and second.state.model_dump_json() == before


def test_a_worker_that_takes_the_lost_attempt_over_cancels_the_resend():
    state = _lost()
    # Kafka redelivered the uncommitted command to another worker, which announces it during the backoff
    t = advance(state, ActionStarted(execution_id="e1", command_id="e1:a:1:1", time=T0 + 31.2, worker_id="w2"))
    assert [(e.event_type, e.worker_id) for e in t.events] == [("action_started", "w2")]
    assert t.state.timers == {"lease:e1:a:1:1": T0 + 31.2 + 30}
    assert advance(t.state, TimerFired(execution_id="e1", timer="resend:e1:a:1:1", time=T0 + 32)).stale


def test_a_late_failure_of_the_lost_attempt_goes_to_the_policy():
    state = _lost(POLICY_RETRY)
    t = advance(state, ActionFailed(execution_id="e1", command_id="e1:a:1:1", time=T0 + 31.5, error="boom"))
    assert [(e.event_type, (e.result or {}).get("kind")) for e in t.events if e.event_type.startswith("action_")] \
        == [("action_started", None), ("action_error", None), ("action_retry", "policy")]
    assert "resend:e1:a:1:1" not in t.state.timers and "retry:a" in t.state.timers


def test_a_report_of_an_attempt_failed_after_exhaustion_is_stale():
    t = start(POLICY_RETRY, lease_retries=1, lease_retry_delay=0)
    t = advance(t.state, ActionStarted(execution_id="e1", command_id="e1:a:1:1", time=T0 + 1))
    t = advance(t.state, TimerFired(execution_id="e1", timer="lease:e1:a:1:1", time=T0 + 31))
    assert [c.command_id for c in t.commands] == ["e1:a:1:1"]      # delay 0: re-sent at once
    t = advance(t.state, ActionStarted(execution_id="e1", command_id="e1:a:1:1", time=T0 + 32))
    t = advance(t.state, TimerFired(execution_id="e1", timer="lease:e1:a:1:1", time=T0 + 62))
    assert [e.event_type for e in t.events] == ["action_error", "action_retry"] and "retry:a" in t.state.timers
    late = advance(t.state, ActionCompleted(execution_id="e1", command_id="e1:a:1:1", time=T0 + 63, result=1))
    assert late.stale and not late.events and "a" not in late.state.results


def test_a_timer_fired_early_or_twice_changes_nothing():
    state = _lost()
    early = advance(state, TimerFired(execution_id="e1", timer="resend:e1:a:1:1", time=T0 + 31.5))
    assert early.stale and not early.commands
    again = advance(state, TimerFired(execution_id="e1", timer="lease:e1:a:1:1", time=T0 + 40))
    assert again.stale and not again.events


def test_replays_decide_the_same():
    runs = []
    for _ in range(2):
        sim = Simulation(hangs_first(2), now=T0)
        sim.start(POLICY_RETRY)
        sim.run()
        runs.append([(e.event_id, e.event_type, e.time, e.result) for e in sim.events])
    assert runs[0] == runs[1]


# ---------------------------------------------------------------------------------------- hostile settings
@pytest.mark.parametrize("field, value", [
    ("lease_retries", -1), ("lease_retries", 10**9), ("lease_retries", "three"), ("lease_retries", 1.5),
    ("lease_retry_delay", -0.1), ("lease_retry_delay", math.inf), ("lease_retry_delay", math.nan),
    ("lease_retry_delay", 1e12), ("lease_retry_delay", "soon"),
])
def test_out_of_range_lease_settings_are_refused_on_the_message(field, value):
    with pytest.raises(ValidationError):
        StartExecution(execution_id="e", time=T0, playbook=NO_RETRY, path="t", **{field: value})
    # the same value on the wire: a decode error (the broker dead-letters the record), never a crash
    wire = json.loads(encode(StartExecution(execution_id="e", time=T0, playbook=NO_RETRY, path="t")))
    wire[field] = value
    with pytest.raises(DecodeError):
        decode_inbound(json.dumps(wire).encode())


# ------------------------------------------------------------------------------------------ recovery rule
def test_a_recovered_lease_fires_no_sooner_than_one_lease_after_the_recovery():
    now = 5_000.0
    assert recovered_fire_time("lease:e:a:1:1", now - 100, 30, now) == now + 30     # overdue: held back
    assert recovered_fire_time("lease:e:a:1:1", now + 50, 30, now) == now + 50      # later anyway: unchanged
    assert recovered_fire_time("retry:a", now - 100, 30, now) == now - 100          # not a lease: when due
    assert recovered_fire_time("resend:e:a:1:1", now - 1, 30, now) == now - 1
