"""The fold's v10 gates, given/when/then over messages (scripted workers, virtual clock): the executor's
final step (V10-1.8), `no_next_is_error` (V10-1.8/5.6), step admission (V10-5.9) and `output.as`
(V10-10.3), as docs/dialect-v10.md "Decisions" settles them."""
from __future__ import annotations

import pytest
import yaml

from noetl_common.dsl import load_playbook
from noetl_common.simulate import Outcome, Simulation


def pb(body: str) -> dict:
    doc = {"apiVersion": "noetl.io/v2", "kind": "Playbook", "metadata": {"name": "t", "path": "t"}}
    doc.update(yaml.safe_load(body))
    return doc


def steps_run(sim: Simulation) -> list[str]:
    return [e.node_name for e in sim.events if e.event_type == "step_started"]


def errors(doc: dict) -> list[tuple[str, str]]:
    playbook, problems = load_playbook(doc)
    found = [(p.path, p.message) for p in problems if p.severity == "error"]
    assert (playbook is None) == bool(found)
    return found


# ---------------------------------------------------------------- executor.spec.final_step

FINAL = pb("""
executor: {spec: {final_step: cleanup}}
workflow:
  - step: start
    tool: {kind: noop}
    next: {spec: {mode: inclusive}, arcs: [{step: a}, {step: b}]}
  - step: a
    tool: {kind: python, code: "result = 1"}
  - step: b
    tool: {kind: python, code: "result = 2"}
    next: {arcs: [{step: c}]}
  - step: c
    tool: {kind: python, code: "result = 3"}
  - step: cleanup
    tool: {kind: python, code: "result = workflow"}
""")


def test_the_final_step_runs_once_after_every_branch_has_ended_and_gives_the_result():
    # given two branches and a final step
    sim = Simulation(lambda cmd: Outcome(result={"step": cmd.step, **cmd.action.data}))
    # when the run goes to its end
    sim.start(FINAL)
    sim.run()
    # then the final step ran last, once, with the run's summary as its input, and its result is the result
    state = sim.state()
    assert steps_run(sim)[-1] == "cleanup" and steps_run(sim).count("cleanup") == 1
    summary = next(c for c in sim.commands if c.step == "cleanup").action.data["workflow"]
    assert summary["status"] == "COMPLETED" and summary["error"] is None and summary["failed_steps"] == []
    assert sorted(summary["completed_steps"]) == ["a", "b", "c", "start"]
    assert state.status == "COMPLETED" and state.result["step"] == "cleanup"


def test_a_failure_stops_routing_lets_steps_in_flight_finish_then_runs_the_final_step_and_fails():
    # given branch a fails while b is still running
    def worker(cmd):
        if cmd.step == "a":
            return Outcome(ok=False, error="ValueError: boom")
        return Outcome(result={"step": cmd.step, **cmd.action.data})
    sim = Simulation(worker)
    # when it runs
    sim.start(FINAL)
    sim.run()
    # then b (in flight) finished but routed nowhere (c never started), cleanup ran with the failure in its
    # input, and the execution failed with the first failure
    state = sim.state()
    ran = steps_run(sim)
    assert "c" not in ran and ran[-1] == "cleanup"
    summary = next(c for c in sim.commands if c.step == "cleanup").action.data["workflow"]
    assert summary["status"] == "FAILED" and summary["failed_steps"] == ["a"]
    assert state.status == "FAILED" and state.error == "step 'a' failed: ValueError: boom"
    assert state.steps["cleanup"].status == "completed"


def test_the_final_steps_own_failure_fails_the_execution_naming_both_failures():
    sim = Simulation(lambda cmd: Outcome(ok=False, error=f"{cmd.step} broke") if cmd.step in ("a", "cleanup")
                     else Outcome(result=1))
    sim.start(FINAL)
    sim.run()
    state = sim.state()
    assert state.status == "FAILED"
    assert state.error == "step 'a' failed: a broke; final step 'cleanup' failed: cleanup broke"
    assert steps_run(sim).count("cleanup") == 1


def test_a_final_step_failing_after_a_clean_run_fails_the_execution():
    sim = Simulation(lambda cmd: Outcome(ok=False, error="no disk") if cmd.step == "cleanup" else Outcome(result=1))
    sim.start(FINAL)
    sim.run()
    assert sim.state().status == "FAILED" and sim.state().error == "final step 'cleanup' failed: no disk"


def test_a_cancel_does_not_run_the_final_step():
    from noetl_common.messages import CancelExecution
    sim = Simulation(lambda cmd: Outcome(result=1))
    sim.start(FINAL)
    sim.deliver(sim.inbox.pop(0))   # started: a and b are in flight
    sim.deliver(CancelExecution(execution_id="e1", time=sim.now, reason="operator"))
    sim.run()
    assert sim.state().status == "CANCELLED" and "cleanup" not in steps_run(sim)


@pytest.mark.parametrize("spec, arcs, where, words", [
    ("{final_step: nowhere}", "", "executor.spec.final_step", "names no step"),
    ("{final_step: start}", "", "executor.spec.final_step", "also the entry"),
    ("{final_step: last}", "[{step: last}]", "workflow[0].next.arcs[0].step", "never by an arc"),
    ("{final_step: 7}", "", "executor.spec.final_step", "names no step"),
    ("{no_next_is_error: 'yes'}", "", "executor.spec.no_next_is_error", "true or false"),
])
def test_bad_executor_specs_are_load_errors_naming_the_place(spec, arcs, where, words):
    doc = pb(f"""
executor: {{spec: {spec}}}
workflow:
  - step: start
    tool: {{kind: noop}}
    {"next: {arcs: " + arcs + "}" if arcs else ""}
  - step: last
    tool: {{kind: noop}}
""")
    found = errors(doc)
    assert len(found) == 1 and found[0][0] == where and words in found[0][1], found


def test_a_final_step_with_arcs_is_a_load_error():
    doc = pb("""
executor: {spec: {final_step: last}}
workflow:
  - step: start
    tool: {kind: noop}
  - step: last
    tool: {kind: noop}
    next: {arcs: [{step: start}]}
""")
    assert [p for p, _ in errors(doc)] == ["workflow[1].next"]


# ---------------------------------------------------------------- executor.spec.no_next_is_error

ROUTER = """
executor: {spec: {no_next_is_error: %s}}
workflow:
  - step: start
    tool: {kind: python, code: "result = 1"}
    set: {ctx.seen: true}
    next: {arcs: [{step: big, when: "{{ output.data > 5 }}"}]}
  - step: big
    tool: {kind: python, code: "result = 2"}
"""


def test_no_next_is_error_turns_an_unmatched_router_into_a_step_failure():
    # given a step whose only arc misses, under no_next_is_error: true
    sim = Simulation(lambda cmd: Outcome(result=1))
    # when it completes
    sim.start(pb(ROUTER % "true"))
    sim.run()
    # then the step failed (its set not applied) and with it the execution, naming the rule
    state = sim.state()
    assert state.status == "FAILED" and state.steps["start"].status == "failed"
    assert "no next arc matched" in state.error and "no_next_is_error" in state.error
    assert "seen" not in state.variables


def test_without_no_next_is_error_an_unmatched_router_ends_its_branch():
    sim = Simulation(lambda cmd: Outcome(result=1))
    sim.start(pb(ROUTER % "false"))
    sim.run()
    assert sim.state().status == "COMPLETED" and steps_run(sim) == ["start"]


def test_no_next_is_error_leaves_steps_without_next_and_matching_routers_alone():
    sim = Simulation(lambda cmd: Outcome(result=9))
    sim.start(pb(ROUTER % "true"))
    sim.run()
    assert sim.state().status == "COMPLETED" and steps_run(sim) == ["start", "big"]


def test_an_unmatched_router_under_no_next_is_error_can_route_its_failure():
    doc = pb("""
executor: {spec: {no_next_is_error: true}}
workflow:
  - step: start
    tool: {kind: python, code: "result = 1"}
    next:
      arcs:
        - {step: big, when: "{{ output.status == 'ok' and output.data > 5 }}"}
        - {step: report, when: "{{ output.status == 'error' }}"}
  - step: big
    tool: {kind: noop}
  - step: report
    tool: {kind: noop}
""")
    sim = Simulation(lambda cmd: Outcome(result=1))
    sim.start(doc)
    sim.run()
    assert steps_run(sim) == ["start", "report"] and sim.state().status == "FAILED"


# ---------------------------------------------------------------- spec.policy.admit

ADMIT = pb("""
workload: {enabled: false}
workflow:
  - step: start
    tool: {kind: noop}
    next: {spec: {mode: inclusive}, arcs: [{step: gated, args: {size: 3}}, {step: open}]}
  - step: gated
    spec:
      policy:
        admit:
          rules:
            - {when: "{{ enabled }}", then: {allow: true}}
            - {when: "{{ input.size > 10 }}", then: {allow: true}}
            - else: {then: {allow: false}}
    tool: {kind: python, code: "result = 1"}
    next: {arcs: [{step: after_gate}]}
  - step: after_gate
    tool: {kind: python, code: "result = 2"}
  - step: open
    tool: {kind: python, code: "result = 3"}
""")


def test_a_denied_step_does_not_run_and_its_branch_ends_quietly():
    # given a gate whose rules deny (workload flag off, arc args too small)
    sim = Simulation(lambda cmd: Outcome(result=cmd.step))
    # when the run reaches it
    sim.start(ADMIT)
    sim.run()
    # then it was skipped (logged, with the deciding rule), nothing after it ran, and the run completed
    assert sorted(steps_run(sim)) == ["open", "start"]
    skipped = [e for e in sim.events if e.event_type == "step_skipped"]
    assert [(e.node_name, e.meta) for e in skipped] == [
        ("gated", {"admit": "workflow[1].spec.policy.admit.rules[2]"})]
    assert sim.state().status == "COMPLETED" and "gated" not in sim.state().results


def test_an_allowing_rule_admits_the_step():
    sim = Simulation(lambda cmd: Outcome(result=cmd.step))
    sim.start(ADMIT, payload={"enabled": True})
    sim.run()
    assert sorted(steps_run(sim)) == ["after_gate", "gated", "open", "start"]


def test_admission_defaults_to_allow_when_no_rule_matches():
    doc = pb("""
workflow:
  - step: start
    spec: {policy: {admit: {rules: [{when: "{{ never_set }}", then: {allow: false}}]}}}
    input: {}
    tool: {kind: python, code: "result = 1"}
""")
    sim = Simulation(lambda cmd: Outcome(result=1))
    sim.start(doc)
    sim.run()
    assert steps_run(sim) == ["start"] and sim.state().status == "COMPLETED"


def test_a_broken_admit_when_fails_the_step_naming_it():
    doc = pb("""
workflow:
  - step: start
    spec: {policy: {admit: {rules: [{when: "{{ 1 / 0 }}", then: {allow: true}}]}}}
    input: {}
    tool: {kind: python, code: "result = 1"}
""")
    sim = Simulation(lambda cmd: Outcome(result=1))
    sim.start(doc)
    sim.run()
    state = sim.state()
    assert state.status == "FAILED" and "admit" in state.error and not sim.commands


@pytest.mark.parametrize("admit, where", [
    ("{rules: {when: x}}", "workflow[0].spec.policy.admit"),
    ("{rules: [{when: '{{ x }}', then: {allow: maybe}}]}", "workflow[0].spec.policy.admit.rules[0].then.allow"),
    ("{rules: [{then: {allow: true}}]}", "workflow[0].spec.policy.admit.rules[0].when"),
])
def test_malformed_admit_rules_are_load_errors(admit, where):
    doc = pb(f"""
workflow:
  - step: start
    spec: {{policy: {{admit: {admit}}}}}
    input: {{}}
    tool: {{kind: noop}}
""")
    assert [p for p, _ in errors(doc)] == [where]


# ---------------------------------------------------------------- tool.output.as

def test_output_as_on_a_tool_names_its_result_for_later_steps():
    doc = pb("""
workflow:
  - step: fetch
    tool: {kind: python, code: "result = {'n': 4}", output: {as: rows}}
    next: {arcs: [{step: use}]}
  - step: use
    input: {n: "{{ rows.n }}", same: "{{ ctx.rows == fetch }}"}
    tool: {kind: python, code: "result = n"}
""")
    playbook, _ = load_playbook(doc)
    assert playbook.steps["fetch"].config["tasks"][0]["set"] == {"rows": "{{ output }}"}   # applied by the worker
    # the worker's ctx patch carries the alias (what the pipeline action sends for a task `set`)
    sim = Simulation(lambda cmd: Outcome(result={"n": 4}, variables={"rows": {"n": 4}}) if cmd.step == "fetch"
                     else Outcome(result=1))
    sim.start(doc)
    sim.run()
    assert next(c for c in sim.commands if c.step == "use").action.data == {"n": 4, "same": True}


def test_output_as_on_a_step_names_the_step_result_even_for_a_loop():
    doc = pb("""
workflow:
  - step: each
    loop: {in: [1, 2], iterator: x}
    tool: {kind: python, code: "result = x"}
    output: {as: all_of_them, store: {kind: s3}}
    next: {arcs: [{step: use}]}
  - step: use
    input: {stats: "{{ all_of_them.stats }}"}
    tool: {kind: python, code: "result = 1"}
""")
    playbook, problems = load_playbook(doc)
    assert any("store" in p.message and p.severity == "warning" for p in problems)   # the rest stays ignored
    sim = Simulation(lambda cmd: Outcome(result=cmd.index if cmd.index is not None else 1))
    sim.start(doc)
    sim.run()
    used = next(c for c in sim.commands if c.step == "use")
    assert used.action.data == {"stats": {"total": 2, "success": 2, "failed": 0}}


@pytest.mark.parametrize("alias, words", [("execution_id", "reserved"), ("fetch", "names step"),
                                          ("'a b'", "plain name")])
def test_bad_output_aliases_are_load_errors(alias, words):
    doc = pb(f"""
workflow:
  - step: fetch
    tool: [{{name: t, kind: python, code: "result = 1", output: {{as: {alias}}}}}]
""")
    found = errors(doc)
    assert len(found) == 1 and words in found[0][1] and found[0][0].endswith("output.as"), found


# ---------------------------------------------------------------- the report counts a pipeline's last attempt

def test_a_task_retried_to_exhaustion_reports_every_attempt():
    """V10-11.3: `attempts` counts the attempts of the step's last task, the failed last one included
    (e2e python_retry_exception: 5 attempts, the report said 4)."""
    from noetl_common.messages import ActionFailed
    from noetl_common.projection import steps
    doc = pb("""
workflow:
  - step: start
    tool: [{name: t, kind: python, code: "raise ValueError('x')"}]
""")
    # given a pipeline step in flight
    sim = Simulation(lambda cmd: Outcome(hang=True))
    sim.start(doc)
    while sim.inbox:   # the start and the attempt's action_started (no timer fires)
        sim.deliver(sim.inbox.pop(0))
    cmd = sim.commands[0]
    # when its worker reports three failed attempts of its task (two retries, then the policy gives up)
    tasks = [{"task": "t", "attempt": n, "ok": False, "error": "ValueError: x",
              "directive": "retry" if n < 3 else "fail"} for n in (1, 2, 3)]
    sim.deliver(ActionFailed(execution_id="e1", command_id=cmd.command_id, time=sim.now, error="t: ValueError: x",
                             tasks=tasks, token=cmd.token))
    # then the report counts three attempts, and each retried attempt's error is logged once
    assert steps(sim.events)["start"]["attempts"] == 3
    assert [e.attempt for e in sim.events if e.event_type == "action_started"] == [1, 2, 3]
    assert len([e for e in sim.events if e.event_type == "action_error"]) == 3
    assert sim.state().status == "FAILED"


# ---------------------------------------------------------------- v2 list `next` (V10-5.10)

V2_NEXT = """
workflow:
  - step: start
    tool: python
    code: "result = 1"
    next:
      - {step: big, when: "{{ result > 5 }}"}
      - {step: small, when: "{{ result < 0 }}"}
      - step: fallback
  - step: big
    tool: python
    code: "result = 2"
  - step: small
    tool: python
    code: "result = 3"
  - step: fallback
    tool: python
    code: "result = 4"
"""


@pytest.mark.parametrize("value, ran", [(9, ["start", "big"]), (1, ["start", "fallback"]),
                                         (-1, ["start", "small"])])
def test_a_v2_list_next_fires_every_true_when_else_only_the_unconditional_entries(value, ran):
    doc = pb(V2_NEXT)
    playbook, _ = load_playbook(doc)
    assert playbook is not None and playbook.dialect == "v2"
    sim = Simulation(lambda cmd: Outcome(result=value if cmd.step == "start" else 0))
    sim.start(doc)
    sim.run()
    assert steps_run(sim) == ran and sim.state().status == "COMPLETED"
