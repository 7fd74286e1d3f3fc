"""Scheduling: turn pending steps into visits once the join rule allows, and start each visit."""
from __future__ import annotations

from noetl_common.engine import iterator, v10_gates
from noetl_common.engine.actions import build_action, render_inputs, send
from noetl_common.engine.errors import StepError
from noetl_common.engine.v10 import noop_result as v10_noop_result
from noetl_common.engine.graph import ready_steps
from noetl_common.engine.lifecycle import complete_step, fail_step
from noetl_common.engine.tick import Tick
from noetl_common.merge import deep_merge
from noetl_common.state import StepRun


def schedule(tick: Tick) -> None:
    """Dispatch every pending step that no active step can still reach, until nothing more is ready."""
    s = tick.state
    while not s.terminal and s.pending:
        ready = ready_steps(list(s.pending), s.active_steps(), tick.compiled.reach)
        if not ready:
            return
        for name in ready:
            if s.terminal:
                return
            dispatch(tick, name)


def dispatch(tick: Tick, name: str) -> None:
    s = tick.state
    arrivals = s.pending.pop(name).arrivals
    step = tick.playbook.steps[name]
    refused = None
    if step.admit:   # V10-5.9: checked on arrival; a denied step does not run and its branch ends quietly
        try:
            allowed, rule = v10_gates.admission(step, tick.context(), _merged(arrivals))
            if not allowed:
                return tick.emit("step_skipped", name, "step", "SKIPPED", meta={"admit": rule})
        except StepError as exc:
            refused = f"admit: {exc}"
    previous = s.steps.get(name)
    visit = previous.visit + 1 if previous else 1
    run = StepRun(status="running", visit=visit, attempt=1, started=tick.time, data={},
                                  action=None, iteration=None, result=None, error=None)
    s.steps[name] = run
    s.set_status(name, "running")
    tick.emit("step_started", name, "step", "RUNNING", meta={"visit": visit})
    if visit > step.max_visits:
        return fail_step(tick, name, f"step '{name}' reached max_visits={step.max_visits}; visit {visit} refused")
    if refused:
        return fail_step(tick, name, refused)
    edge_data = _merged(arrivals)
    context = tick.context()
    try:
        run.data, deferred = render_inputs(step, context, edge_data)
        if step.type == "iterator":
            return iterator.start(tick, step, run, {**context, "data": run.data})
        if step.is_control and step.save is None:
            # a v10 `kind: noop` step's result is its rendered `result` key (V10 §2.2), else null
            result = v10_noop_result(step, context) if tick.playbook.dialect != "v1" else None
            return complete_step(tick, name, result)
        run.action = build_action(step, context, run.data, deferred)
    except StepError as exc:
        return fail_step(tick, name, str(exc))
    if step.is_control:                     # a control step's save runs on a worker with result = null
        send(tick, name, visit, 1, run.action, phase="save", result=None)
    else:
        send(tick, name, visit, 1, run.action)


def _merged(arrivals: list[dict]) -> dict:
    """The edge data of all arrivals, in arrival order."""
    edge_data: dict = {}
    for data in arrivals:
        edge_data = deep_merge(edge_data, data)
    return edge_data
