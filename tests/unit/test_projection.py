"""Read models from the event log agree with the fold's own state."""
from __future__ import annotations

from noetl_common import projection
from noetl_common.simulate import Outcome, Simulation
from test_fold import LOOP, RETRY, pb


def test_status_steps_and_progress_follow_the_log():
    sim = Simulation(lambda cmd: Outcome(ok=False, error="HTTP 500", status_code=500) if cmd.attempt < 3
                     else Outcome(result={"ok": True}))
    sim.start(RETRY)
    assert projection.execution_status([]) == "PENDING"
    sim.deliver(sim.inbox.pop(0))            # the start message alone: start and flaky dispatched
    assert projection.execution_status(sim.events) == "RUNNING"
    assert 0 <= projection.progress(sim.events) < 100
    sim.run()
    steps = projection.steps(sim.events)
    state = sim.state()
    for name, run in state.steps.items():
        assert steps[name]["visits"] == run.visit and steps[name]["attempts"] == run.attempt
        assert steps[name]["status"] == run.status.upper()
    assert steps["flaky"] == {"status": "COMPLETED", "result": {"ok": True}, "attempts": 3, "visits": 1,
                              "error": None}
    assert projection.execution_status(sim.events) == "COMPLETED" and projection.progress(sim.events) == 100
    assert projection.summary(sim.events)["status"] == "COMPLETED"


def test_failed_loop_is_failed_with_the_error():
    sim = Simulation(lambda cmd: Outcome(result={"again": True}))
    sim.start(LOOP)
    sim.run()
    assert projection.execution_status(sim.events) == "FAILED"
    assert "max_visits" in projection.summary(sim.events)["error"]
    assert projection.steps(sim.events)["spin"]["status"] == "FAILED"


def test_render_context_holds_workload_results_and_variables():
    doc = pb("""
workload: {w: 1}
workflow:
  - step: start
    next: [{step: a}]
  - step: a
    type: python
    code: "def main(): return 1"
    save: {name: fav, data: "{{ result }}"}
    next: [{step: end}]
  - step: end
""")
    sim = Simulation(lambda cmd: Outcome(result={"x": 2}, variables={"fav": {"x": 2}}))
    sim.start(doc)
    sim.run()
    ctx = projection.render_context(sim.events)
    assert ctx["workload"] == {"w": 1} and ctx["execution_id"] == "e1"
    assert ctx["a"] == {"x": 2} and ctx["vars"] == {"fav": {"x": 2}} and ctx["fav"] == {"x": 2}
