"""A v10 pipeline's result carried compact (noetl_common.pipeline_result), given/when/then over messages:
templates, the report and the next command see the V10-2.10 overlay; state, events and commands carry each
task result once."""
from __future__ import annotations

import yaml

from noetl_common import projection
from noetl_common.pipeline_result import compact, view
from noetl_common.simulate import Outcome, Simulation
from noetl_common.state import ExecutionState

BLOB = "x" * 50_000

DOC = {"apiVersion": "noetl.io/v2", "kind": "Playbook", "metadata": {"name": "t", "path": "t"}, **yaml.safe_load("""
workflow:
  - step: start
    tool:
      - {name: gen, kind: python, code: "result = 1"}
    next: {arcs: [{step: consume, when: "{{ output.data.status == 'ok' and start._prev.size == 3 }}"}]}
  - step: consume
    tool:
      - {name: check, kind: python, input: {size: "{{ start.size }}", s: "{{ start.results.gen.status }}"},
         code: "result = 1"}
""")}


def worker(cmd):
    if cmd.step == "start":   # what the pipeline worker reports: each task result once
        return Outcome(result=compact({"gen": {"status": "success", "size": 3, "blob": BLOB}}, "gen", "ok", {}))
    return Outcome(result={"shipped": sorted(cmd.action.context["start"])})


def test_templates_and_the_report_see_the_overlay_while_state_events_and_commands_carry_it_once():
    # given a pipeline step whose task returns a large value, and a next step that reads it
    sim = Simulation(worker)
    # when it runs
    sim.start(DOC)
    sim.run()
    state = sim.state()
    # then the arc's `when` saw the overlay (output.data.status, _prev), so consume ran
    assert state.status == "COMPLETED", state.error
    # and the state, the step's events and the next command hold the blob once each (the state keeps a
    # step's result twice, as for v1: `results` and its last visit's `steps.<s>.result`)
    assert state.to_bytes().count(BLOB.encode()) == 2
    assert state.results["consume"]["shipped"] == ["$noetl_pipeline", "results"]
    completed = next(e for e in sim.events if e.event_type == "step_completed" and e.node_name == "start")
    assert completed.model_dump_json().count(BLOB) == 1
    consume = next(c for c in sim.commands if c.step == "consume")
    assert consume.model_dump_json().count(BLOB) == 1
    # and the report shows the overlay, as before
    report = projection.steps(sim.events)["start"]["result"]
    assert report["status"] == "ok" and report["size"] == 3 and report["results"]["gen"]["status"] == "success"
    assert report["_prev"] == report["results"]["gen"] and report["ctx"] == {}


def test_view_is_total_on_hostile_or_malformed_values():
    assert view({"$noetl_pipeline": "x", "results": {}}) == {"$noetl_pipeline": "x", "results": {}}
    assert view({"$noetl_pipeline": {"last": 5}, "results": {}}) == {
        "value": None, "status": "ok", "results": {}, "_prev": None, "ctx": {}}
    assert view([1]) == [1] and view(None) is None
    # a non-mapping last result is {value: ...} (V10-2.10 Decision)
    assert view(compact({"a": 4}, "a", "break", {"k": 1}))["value"] == 4


def test_the_state_knows_its_compact_results_through_every_write_and_after_a_read_back():
    state = ExecutionState(execution_id="e", path="p", playbook={}, workload={}, started=0.0,
                           results={"old": compact({"t": 1}, "t", "ok", {}), "plain": 1})
    assert state.compact_results() == {"old"}
    state.set_result("new", compact({"u": 2}, "u", "ok", {}))
    state.set_result("old", {"now": "plain"})        # a re-visit replaced the compact result
    assert state.compact_results() == {"new"}
    assert ExecutionState.from_bytes(state.to_bytes()).compact_results() == {"new"}
    state.results = {"x": compact({}, None, "ok", {})}   # another dict: worked out again
    assert state.compact_results() == {"x"}
