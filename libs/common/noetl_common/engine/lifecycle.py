"""How steps and executions end: completion with routing, failure, cancel, and telling the parent."""
from __future__ import annotations

from typing import Any

from noetl_common.engine import v10, v10_gates
from noetl_common.engine.errors import StepError
from noetl_common.engine.graph import edge_data, fire
from noetl_common.engine.tick import Tick
from noetl_common.messages import CancelExecution, ChildFinished
from noetl_common.pipeline_result import view
from noetl_common.render import TemplateError, render, this_view
from noetl_common.state import Pending

END_STEP = "end"


def step_scope(tick: Tick, result: Any, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**tick.context(), "data": data or {}, "result": result, "this": this_view(result)}


def complete_step(tick: Tick, name: str, result: Any) -> None:
    """Store the result, route (`next`), and at `end` render the execution result. A routing or result
    template that fails fails the step instead (it is never silently false)."""
    if tick.playbook.dialect != "v1":
        return _complete_v10(tick, name, result)
    step = tick.playbook.steps[name]
    run = tick.state.steps[name]
    tick.state.set_result(name, result)   # its own `next` and `result:` may name it (`{{ envelope.x }}`)
    tick.invalidate()
    scope = step_scope(tick, result, run.data)
    try:
        arrivals = [(edge.step, edge_data(edge, scope)) for edge in fire(step.next, scope)]
        final = _execution_result(step, result, scope) if name == END_STEP else None
    except StepError as exc:
        return fail_step(tick, name, str(exc))
    tick.state.set_status(name, "completed")
    run.result, run.error = result, None
    _forget_inputs(run)
    tick.emit("step_completed", name, "step", "COMPLETED", result=result, duration=tick.time - run.started)
    if name == END_STEP:
        tick.state.result = final
    for target, data in arrivals:
        tick.state.pending.setdefault(target, Pending()).arrivals.append(data)


def _forget_inputs(run: Any) -> None:
    """A finished visit needs neither its rendered action (only retries reuse it) nor its per-item
    bookkeeping: dropping them keeps every later snapshot of the state small. (Only what is set: each
    assignment to a pydantic model is a Python-level __setattr__, and this runs for every step.)"""
    if run.action is not None:
        run.action = None
    if run.data:
        run.data = {}
    if run.iteration is not None:
        run.iteration = None


def _execution_result(step: Any, result: Any, scope: dict[str, Any]) -> Any:
    if step.has_result:
        try:
            return render(step.result, scope)
        except TemplateError as exc:
            raise StepError(f"result: {exc}") from exc
    return None if step.is_control else result


def fail_step(tick: Tick, name: str, error: str) -> None:
    run = tick.state.steps[name]
    tick.state.set_status(name, "failed")
    run.error = error
    _forget_inputs(run)
    tick.emit("step_failed", name, "step", "FAILED", error=error, attempt=run.attempt)
    if tick.playbook.dialect != "v1" and _route_failure(tick, name, error):
        return
    if tick.playbook.final is not None:   # V10-1.8: the final step runs whatever the outcome
        if name == tick.playbook.final:
            return fail_execution(tick, v10_gates.final_error(tick, name, error))
        if v10_gates.wind_down(tick, name, error):
            return
    fail_execution(tick, f"step '{name}' failed: {error}")


# ---------------------------------------------------------------- NoETL DSL v2/v10 (engine/v10.py)

def _complete_v10(tick: Tick, name: str, result: Any) -> None:
    """V10-7.1/5.2: the step `set` (before routing), then exclusive/inclusive arcs and their `set`s. A step
    without `next` (or whose arcs all miss) ends its branch; the last one to complete gives the result."""
    s, step, run = tick.state, tick.playbook.steps[name], tick.state.steps[name]
    s.set_result(name, result)
    tick.invalidate()
    event = "loop.done" if step.iterator is not None else "call.done"
    before = dict(s.variables) if step.set and tick.playbook.no_next_is_error else None
    try:
        patch = {}
        if step.set:
            writes = v10.render_sets(step.set, v10.step_scope(tick.context(), step, result, None, event), "step")
            patch = v10.apply_writes(s.variables, writes)
            tick.invalidate()
        scope = v10.step_scope(tick.context(), step, result, None, event)
        arrivals = []
        if s.winding_down:   # no new step starts (V10-1.8)
            fired = []
        else:   # a v2 list `next` is v1's rule (V10-5.10), an arcs router exclusive/inclusive (V10-5.2)
            fired = v10_gates.fire_list(step.next, scope) if step.next_mode == "all" else v10.fire(step, scope)
        no_match = v10_gates.no_match_error(tick, step, len(fired))
        if no_match:
            if before is not None:   # the step failed: its `set` is not applied
                s.variables = before
            raise StepError(no_match)
        for edge in fired:
            if edge.set:
                patch.update(v10.apply_writes(s.variables, v10.render_sets(edge.set, scope, edge.path)))
                tick.invalidate()   # only a write changes the context the next dispatch renders with
            arrivals.append((edge.step, edge_data(edge, scope)))
    except StepError as exc:
        return fail_step(tick, name, str(exc))
    s.set_status(name, "completed")
    run.result, run.error = result, None
    _forget_inputs(run)
    meta = {"set": patch} if patch else None
    tick.emit("step_completed", name, "step", "COMPLETED", result=result, duration=tick.time - run.started, meta=meta)
    if not arrivals:
        s.result = result
    for target, data in arrivals:
        s.pending.setdefault(target, Pending()).arrivals.append(data)


def _route_failure(tick: Tick, name: str, error: str) -> bool:
    """V10-5.8: arcs with a `when` are evaluated on a failed step; if one fires the run goes on (a cleanup
    path) and the execution still ends FAILED with this step's error (`ExecutionState.error`, sticky)."""
    s, step = tick.state, tick.playbook.steps[name]
    if s.winding_down or not any(edge.when for edge in step.next):
        return False
    scope = v10.step_scope(tick.context(), step, s.results.get(name), error, "call.error")
    try:
        fired = v10.fire(step, scope, failed=True)
    except StepError:
        return False
    if not fired:
        return False
    s.error = s.error or f"step '{name}' failed: {error}"
    for edge in fired:
        s.pending.setdefault(edge.step or "", Pending()).arrivals.append({})
    return True


def fail_execution(tick: Tick, error: str) -> None:
    s = tick.state
    if s.terminal:
        return
    s.status, s.error, s.finished = "FAILED", error, tick.time
    tick.emit("execution_failed", _playbook_name(tick), "playbook", "FAILED", error=error,
              duration=tick.time - s.started)
    _stop_work(tick, f"execution failed: {error}")
    _tell_parent(tick)


def complete_execution(tick: Tick) -> None:
    s = tick.state
    if s.error:   # a v10 step failed and a failure arc ran a cleanup path (V10-5.8): the run still failed
        return fail_execution(tick, s.error)
    s.status, s.finished = "COMPLETED", tick.time
    tick.emit("execution_complete", _playbook_name(tick), "playbook", "COMPLETED", result=s.result,
              duration=tick.time - s.started)
    _tell_parent(tick)


def cancel_execution(tick: Tick, reason: str, principal: str | None = None) -> None:
    s = tick.state
    s.status, s.error, s.finished = "CANCELLED", reason, tick.time
    for name in list(s.active):
        s.set_status(name, "cancelled")
    tick.emit("execution_cancelled", _playbook_name(tick), "playbook", "CANCELLED", error=reason,
              duration=tick.time - s.started, **({"meta": {"principal": principal}} if principal else {}))
    _stop_work(tick, reason)
    _tell_parent(tick)


def finished(tick: Tick) -> bool:
    """Nothing pending and nothing active: the execution is done (DSL §3 Completion)."""
    s = tick.state
    return not s.pending and not s.active_steps()


def _stop_work(tick: Tick, reason: str) -> None:
    """Nothing new is dispatched; child executions still running are cancelled; deadlines are dropped."""
    s = tick.state
    for work in s.work.values():
        if work.child_execution_id:
            tick.requests.append(CancelExecution(execution_id=work.child_execution_id, time=tick.time,
                                                 reason=f"parent {s.execution_id}: {reason}"))
    s.work.clear()
    s.pending.clear()
    s.timers.clear()


def _tell_parent(tick: Tick) -> None:
    message = child_finished(tick.state, tick.time)
    if message is not None:
        tick.requests.append(message)


def child_finished(s: Any, time: float) -> ChildFinished | None:
    """The message a finished child sends its parent (also rebuilt by a runtime that resumes)."""
    if not (s.parent_execution_id and s.parent_command_id and s.terminal):
        return None
    result = s.results.get(s.return_step) if s.return_step else s.result
    if isinstance(result, dict):   # a pipeline's compact result, as the parent (of either dialect) reads it
        result = dict(view(result))
    return ChildFinished(execution_id=s.parent_execution_id, command_id=s.parent_command_id,
                         child_execution_id=s.execution_id, status=s.status, result=result, error=s.error,
                         time=time, token=s.parent_token)


def _playbook_name(tick: Tick) -> str:
    return tick.compiled.playbook.name if tick.compiled else document_name(tick.state.playbook, tick.state.path)


def document_name(document: Any, default: str) -> str:
    """metadata.name of a playbook document that may not be valid (any shape at all)."""
    metadata = document.get("metadata") if isinstance(document, dict) else None
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return str(name) if name is not None else default
