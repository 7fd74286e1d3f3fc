"""The fold's NoETL DSL v10 primitives, given/when/then over messages (scripted workers, virtual clock):
exclusive and inclusive routing, the execution-scoped ctx map (`set` on steps and arcs, patches from a
worker), failure routing, the entry step, terminal results and `loop:` on a step."""
from __future__ import annotations

import yaml

from noetl_common.dsl import load_playbook
from noetl_common.engine import v10
from noetl_common.simulate import Outcome, Simulation


def pb(body: str) -> dict:
    doc = {"apiVersion": "noetl.io/v2", "kind": "Playbook", "metadata": {"name": "t", "path": "t"}}
    doc.update(yaml.safe_load(body))
    return doc


def steps_run(sim: Simulation) -> list[str]:
    return [e.node_name for e in sim.events if e.event_type == "step_started"]


ROUTER = pb("""
workload: {threshold: 5}
workflow:
  - step: first
    tool: {kind: python, code: "result = {'n': 7}"}
    next:
      spec: {mode: exclusive}
      arcs:
        - {step: high, when: "{{ output.data.n > threshold }}", set: {ctx.route: high}}
        - {step: any_match}
        - {step: low}
  - step: high
    tool: {kind: python, code: "result = 1"}
  - step: any_match
    tool: {kind: python, code: "result = 2"}
  - step: low
    tool: {kind: python, code: "result = 3"}
""")


def test_exclusive_routing_fires_only_the_first_matching_arc_and_applies_its_set():
    # given a first step whose result satisfies the first arc's `when` (the later arcs match too)
    sim = Simulation(lambda cmd: Outcome(result={"n": 7} if cmd.step == "first" else cmd.step))
    # when it runs
    sim.start(ROUTER)
    sim.run()
    # then only the first matching arc fired, and its `set` wrote the execution's ctx map
    assert steps_run(sim) == ["first", "high"]
    state = sim.state()
    assert state.status == "COMPLETED" and state.variables == {"route": "high"}
    assert state.result == "high"   # the last terminal step's result (V10-5.7)
    completed = next(e for e in sim.events if e.event_type == "step_completed" and e.node_name == "first")
    assert completed.meta == {"set": {"route": "high"}}   # the patch is logged, so ctx replays


def test_exclusive_routing_falls_through_to_the_first_arc_without_when():
    sim = Simulation(lambda cmd: Outcome(result={"n": 1} if cmd.step == "first" else cmd.step))
    sim.start(ROUTER)
    sim.run()
    assert steps_run(sim) == ["first", "any_match"]


def test_an_undefined_name_in_when_is_false_not_an_error():
    doc = pb("""
workflow:
  - step: first
    tool: {kind: python, code: "result = {}"}
    next:
      arcs:
        - {step: a, when: "{{ output.data.rows[0].x == 1 }}"}
        - {step: b}
  - step: a
    tool: {kind: python, code: "result = 1"}
  - step: b
    tool: {kind: python, code: "result = 2"}
""")
    sim = Simulation(lambda cmd: Outcome(result={"rows": []} if cmd.step == "first" else 1))
    sim.start(doc)
    sim.run()
    assert steps_run(sim) == ["first", "b"] and sim.state().status == "COMPLETED"


def test_inclusive_routing_fans_out_to_every_match_and_the_join_runs_once():
    doc = pb("""
workflow:
  - step: start
    tool: {kind: noop}
    next: {spec: {mode: inclusive}, arcs: [{step: a}, {step: b}, {step: c, when: "{{ false }}"}]}
  - step: a
    tool: {kind: python, code: "result = 1"}
    next: {arcs: [{step: join}]}
  - step: b
    tool: {kind: python, code: "result = 2"}
    next: {arcs: [{step: join}]}
  - step: c
    tool: {kind: python, code: "result = 3"}
  - step: join
    tool: {kind: python, code: "result = 4"}
""")
    sim = Simulation(lambda cmd: Outcome(result=cmd.step))
    sim.start(doc)
    sim.run()
    assert sorted(steps_run(sim)) == ["a", "b", "join", "start"]
    assert steps_run(sim).count("join") == 1


def test_ctx_patches_from_a_worker_and_step_set_are_read_by_later_steps():
    doc = pb("""
ctx: {seed: 1}
workflow:
  - step: first
    tool: [{name: t, kind: python, code: "result = 1"}]
    set: {ctx.doubled: "{{ ctx.counter * 2 }}"}
    next: {arcs: [{step: second}]}
  - step: second
    input: {a: "{{ ctx.counter }}", b: "{{ doubled }}", c: "{{ workload.seed }}"}
    tool: {kind: python, code: "result = 1"}
""")
    sim = Simulation(lambda cmd: Outcome(result={"status": "ok"}, variables={"counter": 21}
                                         if cmd.step == "first" else {}))
    sim.start(doc)
    sim.run()
    second = next(c for c in sim.commands if c.step == "second")
    assert second.action.data == {"a": 21, "b": 42, "c": 1}
    assert sim.state().variables == {"seed": 1, "counter": 21, "doubled": 42}


def test_a_failed_step_routes_only_through_arcs_with_when_and_the_execution_still_fails():
    doc = pb("""
workflow:
  - step: first
    tool: {kind: python, code: "raise ValueError('x')"}
    next:
      arcs:
        - {step: ok_path}
        - {step: cleanup, when: "{{ output.status == 'error' }}"}
  - step: ok_path
    tool: {kind: python, code: "result = 1"}
  - step: cleanup
    tool: {kind: python, code: "result = 2"}
""")
    sim = Simulation(lambda cmd: Outcome(ok=False, error="ValueError: x") if cmd.step == "first"
                     else Outcome(result=2))
    sim.start(doc)
    sim.run()
    state = sim.state()
    assert steps_run(sim) == ["first", "cleanup"]
    assert state.status == "FAILED" and state.error == "step 'first' failed: ValueError: x"


def test_entry_step_is_the_first_step_not_one_named_start():
    doc = pb("""
workflow:
  - step: begin
    tool: {kind: python, code: "result = 1"}
    next: {arcs: [{step: start}]}
  - step: start
    tool: {kind: python, code: "result = 2"}
""")
    playbook, problems = load_playbook(doc)
    assert playbook is not None and playbook.entry == "begin"
    assert any("not the entry" in p.message for p in problems)
    sim = Simulation(lambda cmd: Outcome(result=cmd.step))
    sim.start(doc)
    sim.run()
    assert steps_run(sim) == ["begin", "start"]


LOOP = pb("""
workflow:
  - step: each
    loop: {in: "{{ workload.items }}", iterator: it, spec: {mode: parallel, max_in_flight: 2}}
    input: {value: "{{ it }}", pos: "{{ iter._index }}", n: "{{ loop_index }}"}
    tool: {kind: python, code: "result = value"}
""")


def test_loop_runs_every_iteration_despite_failures_and_reports_results_and_stats():
    # given a loop whose second item fails
    sim = Simulation(lambda cmd: Outcome(ok=False, error="bad") if cmd.index == 1
                     else Outcome(result=cmd.action.data["value"] * 10))
    # when it runs
    sim.start(LOOP, payload={"items": [1, 2, 3]})
    sim.run()
    # then all three iterations ran, and the step fails naming the failed index, with the aggregate kept
    state = sim.state()
    assert sorted(c.index for c in sim.commands) == [0, 1, 2]
    assert state.results["each"] == {"results": [10, None, 30], "stats": {"total": 3, "success": 2, "failed": 1}}
    assert state.status == "FAILED" and "iteration(s) 1 failed" in (state.error or "")
    assert [c.action.data for c in sim.commands if c.index == 2] == [{"value": 3, "pos": 2, "n": 2}]


def test_loop_over_an_empty_list_completes_with_zero_iterations():
    sim = Simulation(lambda cmd: Outcome(result=1))
    sim.start(LOOP, payload={"items": []})
    sim.run()
    state = sim.state()
    assert state.status == "COMPLETED"
    assert state.result == {"results": [], "stats": {"total": 0, "success": 0, "failed": 0}}


def test_pipeline_steps_ship_their_raw_tasks_and_the_whole_context():
    doc = pb("""
workload: {city: Paris}
workflow:
  - step: fetch
    tool:
      - {name: a, kind: python, code: "result = 1", input: {c: "{{ city }}"}}
      - {name: b, kind: http, url: "{{ base }}/x", spec: {policy: {rules: [{else: {then: {do: continue}}}]}}}
""")
    sim = Simulation(lambda cmd: Outcome(result={"status": "ok"}))
    sim.start(doc)
    sim.run()
    action = sim.commands[0].action
    assert action.type == "pipeline"
    assert [t["name"] for t in action.config["tasks"]] == ["a", "b"]
    assert action.config["tasks"][0]["config"]["input"] == {"c": "{{ city }}"}   # rendered by the worker
    assert action.context["ctx"] == {"city": "Paris"} and action.context["job"]["uuid"] == "e1"
    # the ctx map is shipped once: `workload` and `vars` are the same map, bound again by the worker
    assert "workload" not in action.context and "vars" not in action.context
    seen = v10.unship_context(action.context)
    assert seen["workload"] is seen["vars"] is seen["ctx"]


def test_lookups_on_undefined_values_are_undefined_in_v10_templates_and_printing_one_still_fails():
    doc = pb("""
workflow:
  - step: first
    input: {a: "{{ never_ran.rows[0].x | default('none') }}", b: "{{ 1 if never_ran else 2 }}"}
    tool: {kind: python, code: "result = 1"}
    next: {arcs: [{step: second}]}
  - step: second
    input: {c: "{{ first.missing.deeper }}"}
    tool: {kind: python, code: "result = 2"}
""")
    sim = Simulation(lambda cmd: Outcome(result={"ok": True}))
    sim.start(doc)
    sim.run()
    assert sim.commands[0].action.data == {"a": "none", "b": 2}
    state = sim.state()
    assert state.status == "FAILED" and "undefined name 'missing'" in (state.error or "")
