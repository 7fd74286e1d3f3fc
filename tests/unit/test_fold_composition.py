"""A v10 pipeline with a `playbook` task (engine/composition.py), given/when/then over messages: the fold
splits the pipeline at the task, starts the child between two worker segments, carries the pipeline state
in the folded state (snapshots keep it) and hands the child's outcome to the rest of the pipeline."""
from __future__ import annotations

import yaml

from noetl_common.engine import advance
from noetl_common.messages import ActionCompleted, CancelExecution
from noetl_common.simulate import Outcome, Simulation
from noetl_common.state import ExecutionState


def pb(body: str, name: str = "t") -> dict:
    doc = {"apiVersion": "noetl.io/v2", "kind": "Playbook", "metadata": {"name": name, "path": name}}
    doc.update(yaml.safe_load(body))
    return doc


PARENT = pb("""
workload: {users: [ann, bob]}
workflow:
  - step: each
    loop: {in: "{{ users }}", iterator: user}
    tool:
      - {name: pre, kind: python, code: "result = 1"}
      - name: score
        kind: playbook
        path: child
        return_step: finish
        timeout: 30
        input: {who: "{{ user }}"}
      - {name: store, kind: python, code: "result = 2"}
""")

CHILD = pb("""
workflow:
  - step: finish
    tool: {kind: python, code: "result = 1"}
""", name="child")


def pipeline_worker(child_results: dict[str, object] | None = None):
    """A scripted pipeline worker: the first segment stops before task 1 (the playbook task) with its
    state; the continuation echoes what it resumed with. Child steps return {"score": <who>}."""
    def work(cmd):
        if cmd.execution_id.startswith("child:"):
            return Outcome(result={"score": cmd.action.context.get("who", "?")})
        resume = cmd.action.config.get("resume")
        if resume is None:
            return Outcome(suspended={"task": 1, "child": {"path": "child", "return_step": "finish",
                                                          "input": {"who": cmd.action.context.get("user")},
                                                          "timeout": 30},
                                      "state": {"index": 1, "runs": 2, "attempts": [[1, 1]],
                                                "results": {"pre": 1}, "prev": 1, "patch": {}}})
        return Outcome(result={"resumed": resume})
    return work


def test_the_fold_starts_the_child_between_two_segments_and_carries_the_state():
    # given a sequential loop whose pipeline calls a child playbook between two tasks
    sim = Simulation(pipeline_worker(), catalog={"child": CHILD})
    # when it runs
    sim.start(PARENT)
    sim.run()
    # then each iteration is three commands of the same attempt: segment, child, continuation
    parent = [c for c in sim.commands if c.execution_id == "e1"]
    assert [(c.command_id, c.action.type) for c in parent] == [
        ("e1:each:1:1:0", "pipeline"), ("e1:each:1:1:0:p1", "playbook"), ("e1:each:1:1:0:p2", "pipeline"),
        ("e1:each:1:1:1", "pipeline"), ("e1:each:1:1:1:p1", "playbook"), ("e1:each:1:1:1:p2", "pipeline")]
    child_cmd = parent[1]
    assert child_cmd.action.data == {"who": "ann"} and child_cmd.action.config["return_step"] == "finish"
    assert child_cmd.action.timeout == 30
    # and the continuation resumes with the carried state plus the child's outcome (its return_step result)
    state = sim.state()
    assert state.status == "COMPLETED", state.error
    first = state.results["each"]["results"][0]["resumed"]
    assert first["results"] == {"pre": 1} and first["index"] == 1
    assert first["outcome"] == {"task": 1, "ok": True, "result": {"score": "?"}, "error": None,
                                "child": "child:e1:each:1:1:0:p1"}
    assert sim.state("child:e1:each:1:1:0:p1").parent_command_id == "e1:each:1:1:0:p1"
    # and the step attempt is announced once (its later parts are not new attempts)
    started = [e for e in sim.events if e.event_type == "action_started" and e.execution_id == "e1"]
    assert started == []   # loop items log iteration_* events, never action_started
    assert [e.event_type for e in sim.events if e.execution_id == "e1" and e.event_type.startswith("iteration")] \
        == ["iteration_started", "iteration_completed", "iteration_started", "iteration_completed"]


SINGLE = pb("""
workflow:
  - step: s
    tool:
      - {name: score, kind: playbook, path: child, timeout: 5}
      - {name: after, kind: python, code: "result = 2"}
""")


def test_the_state_in_flight_survives_a_snapshot_and_restart():
    # given a pipeline suspended at its playbook task, the child started
    sim = Simulation(pipeline_worker(), catalog={"child": CHILD}, choose=lambda n: 0)
    sim.start(SINGLE)
    while not any(c.action.type == "playbook" for c in sim.commands):
        sim.deliver(sim.inbox.pop(0))
    # when the fold's state is written and read back (a restart recovers it from its snapshot)
    raw = sim.state().to_bytes()
    sim.states["e1"] = ExecutionState.from_bytes(raw)
    work = next(w for w in sim.state().work.values() if w.part == 1)
    assert work.resume["state"]["results"] == {"pre": 1}
    sim.run()
    # then the rest of the pipeline still gets the carried state and the child's result
    state = sim.state()
    assert state.status == "COMPLETED", state.error
    assert state.results["s"]["resumed"]["results"] == {"pre": 1}
    assert state.results["s"]["resumed"]["outcome"]["ok"] is True
    # and the step's attempt is logged once: started by its first part, completed by its last
    kinds = [e.event_type for e in sim.events if e.execution_id == "e1" and e.node_name == "s"]
    assert kinds == ["step_started", "action_started", "action_completed", "step_completed"]


HANGING_CHILD = pb("""
workflow:
  - step: finish
    tool: {kind: python, code: "result = 1"}
""", name="slow")


def test_a_child_that_times_out_is_cancelled_and_its_error_goes_to_the_rest_of_the_pipeline():
    # (the timeout is the one the worker reported with the rendered task: 30 s here)
    # given a playbook task whose child never finishes
    def work(cmd):
        if cmd.execution_id.startswith("child:"):
            return Outcome(hang=True)
        return pipeline_worker()(cmd)
    sim = Simulation(work, catalog={"child": HANGING_CHILD})
    sim.start(SINGLE)
    # when the clock passes the task's timeout
    sim.run()
    # then the child is cancelled and the continuation gets the failure (the task's policy decides there)
    parent = sim.state()
    assert parent.status == "COMPLETED", parent.error
    outcome = parent.results["s"]["resumed"]["outcome"]
    assert outcome["ok"] is False and "timed out after 30s" in outcome["error"]
    assert sim.state("child:e1:s:1:1:p1").status == "CANCELLED"


def test_a_failed_child_is_a_failed_attempt_of_its_task_not_of_the_step():
    def work(cmd):
        if cmd.execution_id.startswith("child:"):
            return Outcome(ok=False, error="boom")
        return pipeline_worker()(cmd)
    sim = Simulation(work, catalog={"child": CHILD})
    sim.start(SINGLE)
    sim.run()
    outcome = sim.state().results["s"]["resumed"]["outcome"]
    assert outcome["ok"] is False and "failed" in outcome["error"] and "boom" in outcome["error"]


def test_a_malformed_suspension_fails_the_attempt_naming_why():
    # given a worker (or a forger with the token) that reports a suspension without a child
    sim = Simulation(lambda cmd: Outcome(suspended={"task": 1, "state": {}}), catalog={"child": CHILD})
    sim.start(SINGLE)
    sim.run()
    state = sim.state()
    assert state.status == "FAILED" and "malformed" in state.error
    assert not any(c.action.type == "playbook" for c in sim.commands)


def test_cancelling_the_parent_cancels_the_child_of_a_suspended_pipeline():
    def work(cmd):
        if cmd.execution_id.startswith("child:"):
            return Outcome(hang=True)
        return pipeline_worker()(cmd)
    sim = Simulation(work, catalog={"child": CHILD})
    sim.start(pb("""
workflow:
  - step: s
    tool:
      - {name: score, kind: playbook, path: child}
      - {name: after, kind: python, code: "result = 2"}
"""))
    while sim.inbox:
        sim.deliver(sim.inbox.pop(0))
    assert sim.state("child:e1:s:1:1:p1").status == "RUNNING"
    sim.deliver(CancelExecution(execution_id="e1", time=sim.now, reason="stop"))
    sim.run()
    assert sim.state().status == "CANCELLED"
    assert sim.state("child:e1:s:1:1:p1").status == "CANCELLED"


def test_a_stale_report_for_a_finished_part_changes_nothing():
    sim = Simulation(pipeline_worker(), catalog={"child": CHILD})
    sim.start(SINGLE)
    sim.run()
    before = sim.state().to_bytes()
    first = sim.commands[0]
    again = advance(sim.state(), ActionCompleted(execution_id="e1", command_id=first.command_id, time=sim.now,
                                                 result=None, token=first.token,
                                                 suspended={"task": 0, "child": {"path": "child"}, "state": {}}))
    assert again.stale and again.commands == [] and sim.state().to_bytes() == before
