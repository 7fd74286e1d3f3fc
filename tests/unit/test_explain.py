"""The explainer, given/when/then over messages: what a running execution waits for, and until when.

Two kinds of tests: one per non-terminal state the fold can be in (the sentence a user reads), and a sweep
that folds whole executions message by message and checks, at every intermediate state, that every command
in flight, every deadline, every active step and every pending step is explained by some item.
"""
from __future__ import annotations

import json

import pytest
import yaml

from noetl_common.explain import DETAIL_LIMIT, explain
from noetl_common.messages import (ActionCompleted, ActionFailed, ActionHeartbeat, ActionStarted, ChildStarted,
                                   StartExecution)
from noetl_common.simulate import Outcome, Simulation
from noetl_common.state import ExecutionState

T0 = 1_700_000_000.0   # 2023-11-14T22:13:20Z


def pb(body: str) -> dict:
    doc = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "t", "path": "t"}}
    doc.update(yaml.safe_load(body))
    return doc


def texts(state: ExecutionState, now: float) -> list[str]:
    return [item.text for item in explain(state, now).items]


class Driver:
    """Messages delivered one by one, by hand: the test says what each worker reports, and when."""

    def __init__(self, document: dict, catalog: dict | None = None) -> None:
        self.sim = Simulation(lambda cmd: Outcome(hang=True), catalog=catalog or {}, now=T0)
        self.sim.deliver(StartExecution(execution_id="e1", time=T0, playbook=document, path="t"))

    @property
    def state(self) -> ExecutionState:
        return self.sim.state()

    def command(self, step: str, index: int | None = None, phase: str = "action"):
        return next(c for c in reversed(self.sim.commands)
                    if c.step == step and c.index == index and c.phase == phase and c.execution_id == "e1")

    def started(self, step: str, t: float, worker: str = "w-3", index: int | None = None, phase: str = "action"):
        cid = self.command(step, index, phase).command_id
        self.sim.deliver(ActionStarted(execution_id="e1", command_id=cid, time=t, worker_id=worker))
        return cid

    def completed(self, step: str, t: float, result=None, index: int | None = None, phase: str = "action"):
        cid = self.command(step, index, phase).command_id
        self.sim.deliver(ActionCompleted(execution_id="e1", command_id=cid, time=t, result=result, started=t))

    def failed(self, step: str, t: float, index: int | None = None):
        cid = self.command(step, index).command_id
        self.sim.deliver(ActionFailed(execution_id="e1", command_id=cid, time=t, error="boom", started=t))


ONE = pb("""
workflow:
  - step: start
    next: [{step: load}]
  - step: load
    type: python
    code: "def main(): return 1"
    next: [{step: end}]
  - step: end
""")


def test_a_dispatched_command_not_yet_taken_by_a_worker():
    d = Driver(ONE)
    assert texts(d.state, T0 + 3) == [
        "step `load` attempt 1 dispatched 3 s ago, not yet taken by a worker (no lease until a worker starts it)"]
    item = explain(d.state, T0 + 3).items[0]
    assert item.kind == "attempt" and item.step == "load" and item.fields["worker_id"] is None
    assert item.fields["command_id"] == "e1:load:1:1"


def test_a_running_attempt_names_its_worker_and_lease_then_a_heartbeat_moves_the_lease():
    d = Driver(ONE)
    cid = d.started("load", T0 + 1)
    assert texts(d.state, T0 + 5) == [
        "step `load` attempt 1 on worker `w-3`, started 4 s ago, no heartbeat yet, lease until 22:13:51, in 26 s"]
    d.sim.deliver(ActionHeartbeat(execution_id="e1", command_id=cid, time=T0 + 20))
    item = explain(d.state, T0 + 24).items[0]
    assert item.text == ("step `load` attempt 1 on worker `w-3`, started 23 s ago, last heartbeat 4 s ago, "
                         "lease until 22:14:10, in 26 s")
    assert item.fields["heartbeat"] == {"epoch": T0 + 20, "iso": "2023-11-14T22:13:40.000Z"}
    assert item.fields["lease_until"]["epoch"] == T0 + 50
    # a lease past its time (the timer has not fired yet) is said to be overdue, not "in -3 s"
    assert explain(d.state, T0 + 53).items[0].text.endswith("lease until 22:14:10, 3 s overdue")


def test_a_step_timeout_bounds_the_lease():
    d = Driver(pb("""
workflow:
  - step: start
    next: [{step: load}]
  - step: load
    type: python
    timeout: 30
    code: "def main(): return 1"
    next: [{step: end}]
  - step: end
"""))
    d.started("load", T0)
    assert texts(d.state, T0 + 10) == [
        "step `load` attempt 1 on worker `w-3`, started 10 s ago, no heartbeat yet, lease until 22:13:55 "
        "(step timeout 30 s + grace), in 25 s"]


RETRY = pb("""
workflow:
  - step: start
    next: [{step: fetch}]
  - step: fetch
    type: http
    endpoint: http://x
    retry: {max_attempts: 5, initial_delay: 10, backoff_multiplier: 1}
    next: [{step: end}]
  - step: end
""")


def test_a_step_waiting_for_its_retry_timer_then_its_next_attempt():
    d = Driver(RETRY)
    d.failed("fetch", T0 + 1)
    d.sim.deliver(ActionStarted(execution_id="e1", command_id="e1:fetch:1:1", time=T0 + 2))   # late: stale
    [item] = explain(d.state, T0 + 5).items
    assert item.kind == "retry" and item.fields["attempt"] == 2 and item.fields["max_attempts"] == 5
    assert item.text == "retry of `fetch` due at 22:13:31 (in 6 s) (attempt 2 of 5)"
    d.sim.fire_next_timer()
    assert texts(d.state, T0 + 12) == [
        "step `fetch` attempt 2 of 5 dispatched 1 s ago, not yet taken by a worker (no lease until a worker "
        "starts it)"]


JOIN = pb("""
workflow:
  - step: start
    next: [{step: a}, {step: b}, {step: x}]
  - step: a
    type: python
    code: "def main(): return 1"
    next: [{step: merge}]
  - step: b
    type: python
    code: "def main(): return 1"
    next: [{step: c}]
  - step: x
    type: python
    code: "def main(): return 1"
    next: [{step: c}]
  - step: c
    type: python
    code: "def main(): return 1"
    next: [{step: merge}]
  - step: merge
    next: [{step: end}]
  - step: end
""")


def test_a_join_waits_for_a_running_branch_and_a_pending_one_behind_it():
    d = Driver(JOIN)
    d.completed("a", T0 + 1)
    d.completed("x", T0 + 2)
    items = explain(d.state, T0 + 3).items
    pending = {i.step: i for i in items if i.kind == "pending"}
    assert pending["merge"].text == "join `merge` waits for `b` (running) and `c` (pending behind `b`) (1 arrival so far)"
    assert pending["merge"].fields["blocked_by"] == ["b", "c"]
    assert pending["c"].text == "join `c` waits for `b` (running) (1 arrival so far)"
    assert [i.step for i in items if i.kind == "attempt"] == ["b"]


CYCLE = pb("""
workflow:
  - step: start
    next: [{step: p}, {step: q}, {step: s}]
  - step: s
    type: python
    code: "def main(): return 1"
    next: [{step: p}]
  - step: p
    next:
      - {step: q, when: "{{ false }}"}
      - {step: end}
  - step: q
    next: [{step: p}]
  - step: end
""")


def test_pending_steps_in_a_cycle_wait_for_what_runs_before_them():
    d = Driver(CYCLE)
    pending = {i.step: i.text for i in explain(d.state, T0).items if i.kind == "pending"}
    assert pending == {"p": "join `p` waits for `s` (running) and `q` (pending behind `s`) (1 arrival so far)",
                       "q": "join `q` waits for `s` (running) and `p` (pending behind `s`) (1 arrival so far)"}


def test_a_step_whose_previous_visit_is_still_running_waits_for_it():
    d = Driver(pb("""
workflow:
  - step: start
    next: [{step: poll}]
  - step: poll
    type: python
    code: "def main(): return 1"
    next: [{step: poll, when: "{{ result < 3 }}"}, {step: end}]
  - step: end
"""))
    d.completed("poll", T0 + 1, result=1)
    assert [i.kind for i in explain(d.state, T0 + 1).items] == ["attempt"]   # the next visit was dispatched
    assert d.command("poll").visit == 2


ITER = pb("""
workflow:
  - step: start
    next: [{step: each}]
  - step: each
    type: iterator
    collection: "{{ range(6) | list }}"
    element: n
    mode: async
    concurrency: 3
    task:
      type: python
      code: "def main(n): return n"
      retry: {max_attempts: 4, initial_delay: 5, backoff_multiplier: 1}
    save: {name: total, data: "{{ result | length }}"}
    next: [{step: end}]
  - step: end
""")


def test_an_iterator_in_flight_with_a_retry_says_done_running_and_waiting():
    d = Driver(ITER)
    d.completed("each", T0 + 1, index=0)
    d.started("each", T0 + 2, worker="w-1", index=1)
    d.failed("each", T0 + 3, index=2)
    items = explain(d.state, T0 + 4).items
    assert items[0].kind == "iterator"
    assert items[0].text == "iterator `each`: 1 of 6 done, 2 running, 1 waiting to retry, concurrency 3"
    assert items[0].fields["done"] == 1 and items[0].fields["retry_wait"] == 1
    retry = [i for i in items if i.kind == "retry"]
    assert [(i.index, i.text) for i in retry] == [
        (2, "retry of `each` item 2 due at 22:13:28 (in 4 s) (attempt 2 of 4)")]
    attempts = {i.index: i.text for i in items if i.kind == "attempt"}
    assert attempts[1].startswith("step `each` item 1 attempt 1 of 4 on worker `w-1`, started 2 s ago")
    assert attempts[3].startswith("step `each` item 3 attempt 1 of 4 dispatched 3 s ago")


def test_an_iterator_with_a_failed_item_waits_for_the_running_ones_to_settle():
    d = Driver(ITER.copy() | {"workflow": [s if s["step"] != "each" else
                                           {**s, "task": {**s["task"], "retry": None}} for s in ITER["workflow"]]})
    d.failed("each", T0 + 1, index=0)
    head = explain(d.state, T0 + 2).items[0]
    assert head.text == ("iterator `each`: 0 of 6 done, 2 running, 1 failed (no new item starts; the step fails "
                         "once the running ones settle), concurrency 3")
    assert head.fields["failed"] == [0]


def test_an_iterator_saving_its_result():
    d = Driver(ITER)
    for i in range(6):
        d.completed("each", T0 + 1 + i, index=i)
    d.started("each", T0 + 8, worker="w-9", phase="save")
    items = explain(d.state, T0 + 9).items
    assert [i.kind for i in items] == ["iterator", "save"]
    assert items[0].text == "iterator `each`: 6 of 6 done, 0 running, concurrency 3"
    assert items[1].text.startswith("step `each` saving its result on worker `w-9`, started 1 s ago")


def test_a_big_iterator_lists_a_bounded_number_of_items():
    d = Driver(pb("""
workflow:
  - step: start
    next: [{step: each}]
  - step: each
    type: iterator
    collection: "{{ range(5000) | list }}"
    element: n
    mode: async
    concurrency: 200
    task: {type: python, code: "def main(n): return n"}
    next: [{step: end}]
  - step: end
"""))
    items = explain(d.state, T0 + 1).items
    assert items[0].text == ("iterator `each`: 0 of 5000 done, 200 running, concurrency 200 "
                             f"({200 - DETAIL_LIMIT} item(s) in flight or waiting not listed below)")
    assert len(items) == 1 + DETAIL_LIMIT
    assert len(json.dumps(explain(d.state, T0 + 1).model_dump())) < 20_000


CHILD = pb("""
workflow:
  - step: start
    next: [{step: call}]
  - step: call
    type: playbook
    path: kid
    timeout: 60
    next: [{step: end}]
  - step: end
""")
KID = pb("""
workflow:
  - step: start
    next: [{step: work}]
  - step: work
    type: python
    code: "def main(): return 1"
    next: [{step: end}]
  - step: end
""")


def test_a_child_execution_running_with_its_step_timeout():
    d = Driver(CHILD, catalog={"kid": KID})
    cid = d.started("call", T0 + 1)
    d.sim.deliver(ChildStarted(execution_id="e1", command_id=cid, child_execution_id="9f2c1d0e-aaaa-bbbb-cccc",
                               time=T0 + 2))
    [item] = explain(d.state, T0 + 4).items
    assert item.kind == "child" and item.fields["child_execution_id"] == "9f2c1d0e-aaaa-bbbb-cccc"
    assert item.text == ("step `call` waits for child execution `9f2c1d0e…` (running); timer of step timeout "
                         "at 22:14:21 (in 57 s)")


def test_a_child_without_timeout_has_no_deadline():
    doc = pb(yaml.safe_dump({"workflow": [s if s["step"] != "call" else {k: v for k, v in s.items() if k != "timeout"}
                                          for s in CHILD["workflow"]]}))
    d = Driver(doc, catalog={"kid": KID})
    cid = d.started("call", T0 + 1)
    d.sim.deliver(ChildStarted(execution_id="e1", command_id=cid, child_execution_id="kid-1", time=T0 + 2))
    assert texts(d.state, T0 + 4) == ["step `call` waits for child execution `kid-1` (running), no timeout"]


def test_a_control_step_save_is_an_attempt_on_a_worker():
    d = Driver(pb("""
workflow:
  - step: start
    next: [{step: mark}]
  - step: mark
    save: {name: flag, data: 1}
    next: [{step: end}]
  - step: end
"""))
    assert texts(d.state, T0 + 2)[0].startswith("step `mark` attempt 1 dispatched 2 s ago")


def test_a_lost_lease_then_the_infrastructure_resend():
    d = Driver(ONE)
    d.started("load", T0 + 1)
    d.sim.fire_next_timer()                      # no heartbeat for 30 s: the lease expires
    [item] = explain(d.state, d.sim.now).items
    state = d.state
    assert item.fields["infra_retries"] == 1 and item.fields["lease_retries"] == state.lease_retries
    assert item.text == (f"step `load` attempt 1 lost its worker (`w-3`): lease expired; sent again at "
                         f"{item.fields['resend_at']['iso'][11:19]} (in {state.lease_retry_delay:g} s), "
                         f"infrastructure retry 1 of {state.lease_retries}")
    d.sim.fire_next_timer()                      # sent again, not yet taken
    assert texts(d.state, d.sim.now + 1) == [
        f"step `load` attempt 1 sent again 1 s ago after a lost lease (infrastructure retry 1 of "
        f"{state.lease_retries}), not yet taken by a worker"]
    d.started("load", d.sim.now + 2, worker="w-4")
    assert texts(d.state, d.sim.now + 4)[0].startswith(
        "step `load` attempt 1 on worker `w-4` (sent 2 times: lost leases), started 2 s ago")


def test_terminal_executions_have_nothing_to_wait_for():
    d = Driver(ONE)
    d.completed("load", T0 + 1)
    [item] = explain(d.state, T0 + 2).items
    assert d.state.status == "COMPLETED"
    assert item.kind == "finished" and item.text == "execution completed at 22:13:21: nothing to wait for"


def test_times_far_apart_read_in_minutes_and_hours():
    d = Driver(ONE)
    assert "dispatched 50 min ago" in texts(d.state, T0 + 3000)[0]
    assert "dispatched 2.8 h ago" in texts(d.state, T0 + 10_000)[0]
    assert "dispatched 0.5 s ago" in texts(d.state, T0 + 0.5)[0]
    assert "dispatched 0 s ago" in texts(d.state, T0 - 5)[0]   # a clock behind the message's time


# ------------------------------------------------------------------------------------------------ the sweep
def covered(state: ExecutionState, now: float) -> None:
    """Every fact the fold waits on is explained by an item (and every item has a sentence and JSON fields)."""
    exp = explain(state, now)
    json.dumps(exp.model_dump())
    assert exp.items and all(item.text for item in exp.items)
    if state.terminal:
        assert [i.kind for i in exp.items] == ["finished"]
        return
    assert "idle" not in {i.kind for i in exp.items}, exp.text   # a running state always waits for something
    commands = {i.fields.get("command_id") for i in exp.items}
    for cid in state.work:
        assert cid in commands, (cid, exp.text)
    for key in state.timers:
        kind, _, rest = key.partition(":")
        if kind in ("lease", "resend"):
            assert rest in commands, (key, exp.text)
            if kind == "resend":
                assert any(i.fields.get("resend_at", {}).get("epoch") == state.timers[key] for i in exp.items)
        else:
            name, _, index = rest.partition(":")
            assert any(i.kind == "retry" and i.step == name and i.index == (int(index) if index else None)
                       and "due" in i.fields for i in exp.items), (key, exp.text)
    for name in state.active:
        assert any(i.step == name for i in exp.items), (name, exp.text)
    for name in state.pending:
        assert any(i.kind == "pending" and i.step == name for i in exp.items), (name, exp.text)


class Sweep(Simulation):
    def deliver(self, message) -> None:
        super().deliver(message)
        for state in self.states.values():
            covered(state, self.now)
        self.checked = getattr(self, "checked", 0) + 1


def flaky(command):
    """Every first attempt fails (retries and iterator retries happen), the rest succeed."""
    if command.attempt == 1 and command.phase == "action":
        return Outcome(ok=False, error="first attempts fail")
    return Outcome(result=1)


def silent(command):
    """Every first attempt's worker goes silent (its lease expires, the attempt is re-sent, and fails)."""
    if command.attempt == 1 and command.phase == "action":
        return Outcome(hang=True)
    return Outcome(result=1)


@pytest.mark.parametrize("document", [ONE, RETRY, JOIN, CYCLE, ITER, CHILD], ids=["one", "retry", "join", "cycle",
                                                                                  "iterator", "child"])
@pytest.mark.parametrize("order", ["first", "last"])
def test_every_intermediate_state_is_explained(document, order):
    retrying = pb(yaml.safe_dump({"workflow": [
        {**s, "retry": {"max_attempts": 3, "initial_delay": 1}} if s.get("type") in ("python", "http") else s
        for s in document["workflow"]]}))
    for doc, worker in ((document, lambda c: Outcome(result=1)), (retrying, flaky), (retrying, silent)):
        sim = Sweep(worker, catalog={"kid": KID}, choose=(lambda n: 0) if order == "first" else (lambda n: n - 1))
        sim.start(doc)
        sim.run(max_messages=5_000)
        assert sim.state().terminal and sim.checked >= 3
