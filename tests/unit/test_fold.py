"""The fold, given/when/then over messages: no I/O, scripted workers, a virtual clock."""
from __future__ import annotations

import yaml

from noetl_common.engine import advance
from noetl_common.messages import ActionCompleted, CancelExecution
from noetl_common.simulate import Outcome, Simulation


def pb(body: str, **extra) -> dict:
    doc = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "t", "path": "t"}}
    doc.update(yaml.safe_load(body))
    doc.update(extra)
    return doc


def ok(result=None):
    return lambda cmd: Outcome(result=result if result is not None else {"step": cmd.step})


LINEAR = pb("""
workflow:
  - step: start
    next: [{step: a, data: {x: 1}}]
  - step: a
    type: python
    code: "def main(x): return x"
    next: [{step: end}]
  - step: end
""")


def test_linear_event_sequence_and_result():
    sim = Simulation(ok({"v": 1}))
    sim.start(LINEAR)
    sim.run()
    assert sim.log() == ["execution_start:t", "step_started:start", "step_completed:start", "step_started:a",
                         "action_started:a", "action_completed:a", "step_completed:a", "step_started:end",
                         "step_completed:end", "execution_complete:t"]
    state = sim.state()
    assert state.status == "COMPLETED" and state.results["a"] == {"v": 1}
    assert sim.commands[0].action.data == {"x": 1}
    assert sim.commands[0].command_id == "e1:a:1:1"


def test_same_messages_give_same_event_ids():
    runs = []
    for _ in range(2):
        sim = Simulation(ok())
        sim.start(LINEAR)
        sim.run()
        runs.append([(e.event_id, e.event_type) for e in sim.events])
    assert runs[0] == runs[1]


FANOUT = pb("""
workflow:
  - step: start
    next: [{step: a}, {step: b}]
  - step: a
    type: python
    code: "def main(): return 1"
    next: [{step: c}]
  - step: c
    type: python
    code: "def main(): return 1"
    next: [{step: end, data: {from_c: "{{ result.n }}"}}]
  - step: b
    type: python
    code: "def main(): return 1"
    next: [{step: end, data: {from_b: "{{ result.n }}"}}]
  - step: end
    type: python
    code: "def main(**kw): return kw"
""")


def test_join_waits_for_every_started_branch_and_merges_edge_data():
    for pick_last in (False, True):     # any delivery order gives one visit of `end` with both arrivals
        sim = Simulation(lambda cmd: Outcome(result={"n": cmd.step}),
                         choose=(lambda n: n - 1) if pick_last else (lambda n: 0))
        sim.start(FANOUT)
        sim.run()
        ends = [c for c in sim.commands if c.step == "end"]
        assert len(ends) == 1 and ends[0].action.data == {"from_c": "c", "from_b": "b"}
        log = sim.log()
        assert log.index("step_started:end") > log.index("step_completed:b")
        assert log.index("step_started:end") > log.index("step_completed:c")
        assert sim.state().result == {"n": "end"}     # an actionable end without result: gives its own


ROUTING = pb("""
workload: {n: 5}
workflow:
  - step: start
    next:
      - when: "{{ workload.n > 10 }}"
        step: big
      - step: default_path
        data: {seen: "{{ workload.n }}"}
  - step: big
    type: python
    code: "def main(): return 1"
  - step: default_path
    type: python
    code: "def main(seen): return seen"
    next:
      - when: "{{ result % 2 == 1 }}"
        then: [{step: odd, data: {v: "{{ result }}"}}]
        else: [{step: even}]
  - step: odd
    type: python
    code: "def main(v): return v"
    next: [{step: end}]
  - step: even
    type: python
    code: "def main(): return 0"
    next: [{step: end}]
  - step: end
    result: {odd: "{{ odd }}", path: "default"}
""")


def test_default_route_then_else_and_native_end_result():
    sim = Simulation(lambda cmd: Outcome(result=cmd.action.data.get("seen", cmd.action.data.get("v"))))
    sim.start(ROUTING)
    sim.run()
    steps = sim.state().steps
    assert "big" not in steps and "even" not in steps
    assert steps["odd"].result == 5
    assert sim.state().result == {"odd": 5, "path": "default"}


def test_a_when_that_fails_to_render_fails_the_step():
    doc = pb("""
workflow:
  - step: start
    next:
      - when: "{{ nope.x > 1 }}"
        step: end
  - step: end
""")
    sim = Simulation(ok())
    sim.start(doc)
    sim.run()
    state = sim.state()
    assert state.status == "FAILED" and "nope" in state.error and "start" in state.error


LOOP = pb("""
workflow:
  - step: start
    next: [{step: spin}]
  - step: spin
    type: python
    max_visits: 4
    code: "def main(): return 1"
    next:
      - when: "{{ result.again }}"
        step: spin
      - step: end
  - step: end
""")


def test_max_visits_stops_a_loop_with_a_clear_error():
    sim = Simulation(ok({"again": True}))
    sim.start(LOOP)
    sim.run()
    state = sim.state()
    assert state.status == "FAILED"
    assert "spin" in state.error and "max_visits" in state.error
    assert len([c for c in sim.commands if c.step == "spin"]) == 4


def test_polling_loop_revisits_until_the_condition_changes():
    count = {"n": 0}

    def worker(cmd):
        count["n"] += 1
        return Outcome(result={"again": count["n"] < 3})
    sim = Simulation(worker)
    sim.start(LOOP)
    sim.run()
    assert sim.state().status == "COMPLETED"
    assert sim.state().steps["spin"].visit == 3


RETRY = pb("""
workflow:
  - step: start
    next: [{step: flaky}]
  - step: flaky
    type: http
    endpoint: http://x
    retry: {max_attempts: 5, initial_delay: 0.4, backoff_multiplier: 2, max_delay: 0.5, retry_when: "{{ status_code >= 500 }}"}
    next: [{step: end}]
  - step: end
""")


def test_retry_backoff_is_durable_sub_second_and_capped():
    calls = []

    def worker(cmd):
        calls.append(cmd)
        if cmd.attempt <= 3:
            return Outcome(ok=False, error="HTTP 500", status_code=500)
        return Outcome(result={"status_code": 200})
    sim = Simulation(worker)
    sim.start(RETRY)
    t0 = sim.now
    sim.run()
    assert [c.attempt for c in calls] == [1, 2, 3, 4]
    assert [round(c.time - t0, 3) for c in calls] == [0.0, 0.4, 0.9, 1.4]
    assert sim.state().status == "COMPLETED" and sim.state().steps["flaky"].attempt == 4
    assert sim.log().count("action_retry:flaky") == 3


def test_retry_when_false_means_one_attempt():
    sim = Simulation(lambda cmd: Outcome(ok=False, error="HTTP 404", status_code=404))
    sim.start(RETRY)
    sim.run()
    state = sim.state()
    assert state.status == "FAILED" and state.steps["flaky"].attempt == 1 and "404" in state.error


def test_duplicate_and_stale_results_change_nothing():
    sim = Simulation(lambda cmd: Outcome(ok=False, error="HTTP 500", status_code=500) if cmd.attempt == 1
                     else Outcome(result={"ok": True}))
    sim.start(RETRY)
    sim.run()
    state = sim.state()
    before = (state.model_dump_json(), len(sim.events))
    # a late answer for attempt 1 and a duplicate of attempt 2's completion
    for cid in ("e1:flaky:1:1", "e1:flaky:1:2"):
        transition = advance(state, ActionCompleted(execution_id="e1", command_id=cid, time=sim.now, result=1))
        assert transition.stale and not transition.events and not transition.commands
    assert (state.model_dump_json(), len(sim.events)) == before


def test_stale_attempt_is_ignored_while_the_next_attempt_runs():
    sim = Simulation(lambda cmd: Outcome(ok=False, error="HTTP 500", status_code=500) if cmd.attempt == 1
                     else Outcome(hang=True))
    sim.start(RETRY)
    while not (sim.commands and sim.commands[-1].attempt == 2):
        sim.deliver(sim.inbox.pop(0)) if sim.inbox else sim.fire_next_timer()
    while sim.inbox:
        sim.deliver(sim.inbox.pop(0))
    state = sim.state()
    transition = advance(state, ActionCompleted(execution_id="e1", command_id="e1:flaky:1:1", time=sim.now))
    assert transition.stale and "e1:flaky:1:2" in state.work


def test_a_lost_worker_times_out_by_lease_and_the_retry_runs():
    doc = pb("""
workflow:
  - step: start
    next: [{step: slow}]
  - step: slow
    type: python
    timeout: 2
    retry: {max_attempts: 2}
    code: "def main(): pass"
    next: [{step: end}]
  - step: end
""")
    sim = Simulation(lambda cmd: Outcome(hang=True) if cmd.attempt == 1 else Outcome(result=7))
    sim.start(doc)
    t0 = sim.now
    sim.run()
    assert sim.state().status == "COMPLETED" and sim.state().results["slow"] == 7
    # the worker never reported (not even its own timeout): the attempt is sent 4 times (3 infrastructure
    # retries, each after the lease = timeout + grace and a backoff of 1, 2, 4 s), then the policy retries it
    errors = [e for e in sim.events if e.event_type == "action_error"]
    assert [e.error for e in errors] == ["timed out after 2s with no report from the worker "
                                         "(the attempt was sent 4 times)"]
    assert errors[0].time - t0 == 4 * (2 + 5) + 1 + 2 + 4
    assert [c.command_id for c in sim.commands if c.step == "slow"] == ["e1:slow:1:1"] * 4 + ["e1:slow:1:2"]


ITER = pb("""
workload: {items: [5, 1, 4, 2, 3, 0]}
workflow:
  - step: start
    next: [{step: each}]
  - step: each
    type: iterator
    collection: "{{ workload.items }}"
    element: n
    mode: async
    concurrency: 2
    task:
      type: python
      data: {n: "{{ n }}", i: "{{ _loop.index }}", size: "{{ _loop.size }}"}
      code: "def main(n, i, size): return n"
    next: [{step: end, data: {total: "{{ result | sum }}"}}]
  - step: end
    result: "{{ each }}"
""")


def test_iterator_results_are_in_collection_order_and_concurrency_is_capped():
    sim = Simulation(lambda cmd: Outcome(result=cmd.action.data["n"] * 10), choose=lambda n: n - 1)
    sim.start(ITER)
    in_flight = peak = 0
    while sim.inbox:
        before = len(sim.commands)
        sim.deliver(sim.inbox.pop(len(sim.inbox) - 1))
        state = sim.state()
        if not state.terminal and state.steps.get("each") and state.steps["each"].iteration:
            in_flight = len(state.steps["each"].iteration.attempts)
            peak = max(peak, in_flight)
        assert len(sim.commands) - before <= 2
    assert sim.state().status == "COMPLETED"
    assert sim.state().result == [50, 10, 40, 20, 30, 0]
    assert peak <= 2
    assert [c.action.data["size"] for c in sim.commands if c.step == "each"] == [6] * 6


def test_iterator_item_failure_stops_new_items_and_names_the_index():
    doc = pb("""
workflow:
  - step: start
    next: [{step: each}]
  - step: each
    type: iterator
    collection: [1, 2, 0, 4]
    element: d
    task:
      type: python
      data: {d: "{{ d }}"}
      retry: {max_attempts: 2}
      code: "def main(d): return 12 // d"
    next: [{step: end}]
  - step: end
""")
    sim = Simulation(lambda cmd: Outcome(result=12 // cmd.action.data["d"]) if cmd.action.data["d"]
                     else Outcome(ok=False, error="ZeroDivisionError: division by zero"))
    sim.start(doc)
    sim.run()
    state = sim.state()
    assert state.status == "FAILED" and "2" in state.error and "division" in state.error
    assert [c.index for c in sim.commands] == [0, 1, 2, 2]     # item 3 never started; item 2 tried twice
    assert sim.log().count("iteration_failed:each") == 1


CHILD = pb("""
workflow:
  - step: start
    next: [{step: call}]
  - step: call
    type: playbook
    path: kid
    return_step: work
    data: {x: 7}
    next: [{step: end, data: {got: "{{ result.product }}"}}]
  - step: end
    result: "{{ call.product }}"
""")
KID = pb("""
workload: {x: 1}
workflow:
  - step: start
    next: [{step: work}]
  - step: work
    type: python
    data: {x: "{{ workload.x }}"}
    code: "def main(x): return {'product': x * 3}"
    next: [{step: end}]
  - step: end
""", metadata={"name": "kid", "path": "kid"})


def test_child_playbook_waits_and_returns_the_return_step_result():
    sim = Simulation(lambda cmd: Outcome(result={"product": cmd.action.data["x"] * 3}), catalog={"kid": KID})
    sim.start(CHILD)
    sim.run()
    assert sim.state().status == "COMPLETED" and sim.state().result == 21
    child = sim.state("child:e1:call:1:1")
    assert child.parent_execution_id == "e1" and child.workload == {"x": 7}


def test_child_failure_fails_the_parent_step_with_the_child_error():
    sim = Simulation(lambda cmd: Outcome(ok=False, error="RuntimeError: child exploded"), catalog={"kid": KID})
    sim.start(CHILD)
    sim.run()
    state = sim.state()
    assert state.status == "FAILED" and "child exploded" in state.error and "call" in state.error


def test_cancelling_the_parent_cancels_its_child():
    sim = Simulation(lambda cmd: Outcome(hang=True), catalog={"kid": KID})
    sim.start(CHILD)
    while sim.inbox:
        sim.deliver(sim.inbox.pop(0))
    sim.deliver(CancelExecution(execution_id="e1", time=sim.now))
    while sim.inbox:
        sim.deliver(sim.inbox.pop(0))
    assert sim.state().status == "CANCELLED"
    assert sim.state("child:e1:call:1:1").status == "CANCELLED"


def test_an_undefined_name_fails_the_step_naming_it():
    doc = pb("""
workflow:
  - step: start
    next: [{step: use}]
  - step: use
    type: python
    data: {v: "{{ workload.not_there_at_all }}"}
    code: "def main(v): return v"
  - step: end
""")
    sim = Simulation(ok())
    sim.start(doc)
    sim.run()
    state = sim.state()
    assert state.status == "FAILED" and "not_there_at_all" in state.steps["use"].error
    assert not sim.commands


def test_secret_templates_are_deferred_to_the_worker_with_only_the_names_they_use():
    doc = pb("""
workload: {base: "http://h", unused: "big"}
workflow:
  - step: start
    next: [{step: call}]
  - step: call
    type: http
    endpoint: "{{ workload.base }}/x"
    headers: {X-Key: "{{ secret.API_KEY }}-{{ workload.base }}"}
    next: [{step: end}]
  - step: end
""")
    sim = Simulation(ok())
    sim.start(doc)
    sim.run()
    action = sim.commands[0].action
    assert action.config["endpoint"] == "http://h/x"
    assert action.config["headers"]["X-Key"] == "{{ secret.API_KEY }}-{{ workload.base }}"
    assert action.deferred == [["config", "headers", "X-Key"]]
    assert action.context == {"workload": {"base": "http://h", "unused": "big"}}


def test_variables_from_saves_are_readable_later():
    doc = pb("""
workflow:
  - step: start
    next: [{step: a}]
  - step: a
    type: python
    code: "def main(): return 1"
    save: {name: fav, data: "{{ result }}"}
    next: [{step: b}]
  - step: b
    type: python
    data: {c: "{{ fav.color }}", d: "{{ vars.fav.color }}"}
    code: "def main(c, d): return c"
    next: [{step: end}]
  - step: end
""")
    sim = Simulation(lambda cmd: Outcome(result=1, variables={"fav": {"color": "teal"}}) if cmd.step == "a"
                     else Outcome(result=cmd.action.data))
    sim.start(doc)
    sim.run()
    assert sim.state().results["b"] == {"c": "teal", "d": "teal"}


def test_a_quick_attempt_reporting_only_its_completion_still_logs_started_then_completed():
    from noetl_common.messages import StartExecution
    state = advance(None, StartExecution(execution_id="q", time=10.0, playbook=LINEAR, path="t")).state
    transition = advance(state, ActionCompleted(execution_id="q", command_id="q:a:1:1", time=10.5, started=10.2,
                                                result=3))
    kinds = [e.event_type for e in transition.events]
    assert kinds[:3] == ["action_started", "action_completed", "step_completed"]
    assert transition.events[1].duration == 10.5 - 10.2


def test_action_events_name_the_worker_that_ran_the_attempt():
    from noetl_common.messages import ActionFailed, ActionStarted, StartExecution, TimerFired
    doc = pb("""
workflow:
  - step: start
    next: [{step: a}]
  - step: a
    type: python
    retry: {max_attempts: 3, initial_delay: 1, jitter: false}
    code: "def main(): return 1"
    next: [{step: end}]
  - step: end
""")
    state = advance(None, StartExecution(execution_id="w", time=10.0, playbook=doc, path="t",
                                         lease_seconds=30, lease_retries=0)).state
    # attempt 1 announces itself, then its worker is lost: with no infrastructure retries (lease_retries=0)
    # the lease fails it at once, with no worker to name
    t = advance(state, ActionStarted(execution_id="w", command_id="w:a:1:1", time=10.1, worker_id="host-11"))
    assert [(e.event_type, e.worker_id) for e in t.events] == [("action_started", "host-11")]
    t = advance(t.state, TimerFired(execution_id="w", timer="lease:w:a:1:1", time=40.1))
    assert [(e.event_type, e.worker_id) for e in t.events if e.event_type == "action_error"] == [("action_error", None)]
    # attempt 2 fails quickly on another worker; attempt 3 succeeds quickly on a third
    t = advance(t.state, TimerFired(execution_id="w", timer="retry:a", time=41.1))
    t = advance(t.state, ActionFailed(execution_id="w", command_id="w:a:1:2", time=41.3, started=41.2,
                                      error="boom", worker_id="host-22"))
    assert [(e.event_type, e.attempt, e.worker_id) for e in t.events if e.event_type.startswith("action_")] == [
        ("action_started", 2, "host-22"), ("action_error", 2, "host-22"), ("action_retry", 2, None)]
    t = advance(t.state, TimerFired(execution_id="w", timer="retry:a", time=43.5))
    t = advance(t.state, ActionCompleted(execution_id="w", command_id="w:a:1:3", time=43.7, started=43.6,
                                         result=1, worker_id="host-33"))
    assert [(e.event_type, e.worker_id) for e in t.events if e.event_type.startswith("action_")] == [
        ("action_started", "host-33"), ("action_completed", "host-33")]
    assert t.state.status == "COMPLETED"
