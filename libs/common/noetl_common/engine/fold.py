"""advance(state, message) -> Transition: the one function both runtimes (embedded, faust) call.

Pure: no I/O, no clock, no randomness; time and ids arrive on the message. The state passed in is owned by
the call and is mutated in place (see state.py for why).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from noetl_common.attempt_tokens import genuine
from noetl_common.caps import DEFAULT_CAPS, Caps
from noetl_common.dsl import load_playbook
from noetl_common.dsl.read_only import plain
from noetl_common.engine import composition, iterator, v10, v10_gates
from noetl_common.engine.actions import send, work_action
from noetl_common.engine.dispatch import schedule
from noetl_common.engine.leases import LEASE, LEASE_GRACE, RESEND, infra_retry_delay
from noetl_common.engine.lifecycle import (cancel_execution, complete_execution, complete_step, document_name,
                                           fail_execution, fail_step, finished)
from noetl_common.engine.retry import decide
from noetl_common.engine.tick import Tick, compile_state
from noetl_common.merge import deep_merge
from noetl_common.messages import (ActionCompleted, ActionFailed, ActionHeartbeat, ActionStarted, CancelExecution,
                                   ChildFinished, ChildStarted, Command, Event, StartExecution, TimerFired)
from noetl_common.state import ExecutionState, Pending, Work

__all__ = ["LEASE_GRACE", "Transition", "advance"]


@dataclass
class Transition:
    state: ExecutionState | None
    events: list[Event] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)     # messages for other executions' keys
    timers: dict[str, float] = field(default_factory=dict)  # deadlines set by this message
    stale: bool = False                                     # the message was a duplicate or out of date
    forged: bool = False                                    # of those: a fact without its attempt's token


def advance(state: ExecutionState | None, msg: Any, caps: Caps = DEFAULT_CAPS) -> Transition:
    """Fold one inbound message; return the new state, the events to append and the commands to send.

    `caps`: the operator's caps (noetl_common.caps), given by the runtime that owns the fold. Read only when
    `msg` starts an execution, which records them: later messages use the caps their execution started under."""
    if isinstance(msg, StartExecution):
        if state is not None:
            return Transition(state, stale=True)
        tick = _start(msg, caps.for_fold())
    elif state is None or state.terminal:
        return Transition(state, stale=True)
    elif isinstance(msg, _FACTS) and not genuine(state.fact_key, msg.command_id, msg.token):
        # a forged fact (or one for another attempt's token): dropped before it can touch anything
        return Transition(state, stale=True, forged=True)
    else:
        tick = Tick(state, compile_state(state), msg.time)
        _HANDLERS[type(msg)](tick, msg)
    if not tick.state.terminal:
        schedule(tick)
        if not tick.state.terminal and finished(tick) and tick.playbook.final and v10_gates.start_final(tick):
            schedule(tick)   # V10-1.8: quiescent, so the final step runs (once)
        if not tick.state.terminal and finished(tick):
            complete_execution(tick)
    return Transition(tick.state, tick.events, tick.commands, tick.requests, tick.timers, tick.stale)


def fail_on_error(state: ExecutionState | None, msg: Any, error: str) -> Transition:
    """Fail an execution because folding `msg` went wrong in a way the fold did not foresee (an exception,
    a value that cannot be saved). `state` is a clean state (as it was before `msg`), None when `msg` is the
    start itself. The failure goes through the normal lifecycle: children are cancelled, the parent is told.
    Raises when even that cannot be done (the caller then quarantines the execution)."""
    if state is None:
        if not isinstance(msg, StartExecution):
            return Transition(None, stale=True)   # nothing exists to fail (advance(None, fact) is stale anyway)
        state = ExecutionState(
            execution_id=msg.execution_id, path=msg.path, version=msg.version, playbook=msg.playbook,
            workload=dict(msg.payload), parent_execution_id=msg.parent_execution_id,
            parent_command_id=msg.parent_command_id, parent_step=msg.parent_step, return_step=msg.return_step,
            fact_key=msg.fact_key, parent_token=msg.parent_token, lease_seconds=msg.lease_seconds, started=msg.time)
        tick = Tick(state, None, msg.time)
        tick.emit("execution_start", document_name(state.playbook, state.path), "playbook", "STARTED", meta={
            "path": msg.path, "version": msg.version, "workload": state.workload,
            "parent_execution_id": msg.parent_execution_id, "parent_step": msg.parent_step})
    elif state.terminal:
        return Transition(state, stale=True)
    else:
        tick = Tick(state, compile_state(state), msg.time)
    fail_execution(tick, error)
    return Transition(tick.state, tick.events, tick.commands, tick.requests, tick.timers)


def _start(msg: StartExecution, caps: Caps) -> Tick:
    playbook, problems = load_playbook(msg.playbook, caps)
    base = plain(playbook.workload) if playbook else {}   # the state's own: the playbook is read-only
    state = ExecutionState(
        execution_id=msg.execution_id, path=msg.path, version=msg.version, playbook=msg.playbook,
        workload=deep_merge(base, msg.payload), parent_execution_id=msg.parent_execution_id,
        parent_command_id=msg.parent_command_id, parent_step=msg.parent_step, return_step=msg.return_step,
        fact_key=msg.fact_key, parent_token=msg.parent_token, lease_seconds=msg.lease_seconds,
        lease_retries=msg.lease_retries, lease_retry_delay=msg.lease_retry_delay, started=msg.time,
        max_visits_cap=caps.max_visits, max_iterator_items=caps.max_iterator_items)
    tick = Tick(state, compile_state(state, playbook), msg.time)
    name = playbook.name if playbook else document_name(msg.playbook, msg.path)
    tick.emit("execution_start", name, "playbook", "STARTED", meta={
        "path": msg.path, "version": msg.version, "workload": state.workload,
        "parent_execution_id": msg.parent_execution_id, "parent_step": msg.parent_step,
        **({"principal": msg.principal} if msg.principal is not None else {})})
    if playbook is None:
        errors = "; ".join(f"{p.path}: {p.message}" for p in problems if p.severity == "error")
        fail_execution(tick, f"invalid playbook: {errors}")
    else:
        if playbook.dialect != "v1":   # V10-7.5: root `ctx:` and the payload's `ctx` seed the ctx map
            payload_ctx = msg.payload.get("ctx") if isinstance(msg.payload.get("ctx"), dict) else {}
            state.variables = deep_merge(plain(playbook.ctx), payload_ctx)
        state.pending[playbook.entry] = Pending(arrivals=[{}])
    return tick


def _cancel(tick: Tick, msg: CancelExecution) -> None:
    cancel_execution(tick, msg.reason, principal=msg.principal)


def _action_started(tick: Tick, msg: ActionStarted) -> None:
    work = tick.state.work.get(msg.command_id)
    if work is None or work.started is not None:
        tick.stale = True
        return
    _mark_started(tick, work, msg.time, msg.worker_id)
    if work.infra_retries:   # a worker holds the lost attempt again (e.g. Kafka redelivered it): no re-send
        tick.clear_timer(f"{RESEND}{work.command_id}")
    if work.child_execution_id:   # the child started first (delivery order): its bound is already set
        return
    tick.set_timer(f"lease:{work.command_id}", msg.time + _lease(tick, work))


def _mark_started(tick: Tick, work: Work, started: float, worker_id: str | None) -> None:
    """Record the start of an attempt (from ActionStarted, or from a quick attempt's own final report)."""
    work.started, work.worker_id = started, worker_id
    if _is_attempt(tick, work) and not work.part:   # a split pipeline's attempt started with its first part
        tick.emit("action_started", work.step, "task", "STARTED", attempt=work.attempt, command_id=work.command_id,
                  worker_id=worker_id)


def _heartbeat(tick: Tick, msg: ActionHeartbeat) -> None:
    work = tick.state.work.get(msg.command_id)
    if work is not None and work.started is not None:
        work.heartbeat = max(work.heartbeat or 0.0, msg.time)   # what the explainer reports as "last heartbeat"
    if work is None or work.started is None or _timeout(tick, work) is not None or work.child_execution_id:
        tick.stale = work is None
        return
    tick.set_timer(f"lease:{work.command_id}", msg.time + tick.state.lease_seconds)


def _child_started(tick: Tick, msg: ChildStarted) -> None:
    work = tick.state.work.get(msg.command_id)
    if work is None:
        tick.stale = True
        return
    work.child_execution_id = msg.child_execution_id
    timeout = _timeout(tick, work)   # a child has no lease: the parent waits for it, bounded only by timeout
    if timeout is None:
        tick.clear_timer(f"lease:{work.command_id}")
    else:
        tick.set_timer(f"lease:{work.command_id}", (work.started or msg.time) + timeout)


def _child_finished(tick: Tick, msg: ChildFinished) -> None:
    work = tick.state.work.get(msg.command_id)
    if work is not None and composition.is_child(work):   # a child of a split v10 pipeline: go on with it
        tick.state.work.pop(msg.command_id)
        _release(tick, work)
        error = None if msg.status == "COMPLETED" else \
            f"child execution {msg.child_execution_id} {msg.status.lower()}: {msg.error}"
        return composition.child_done(tick, work, error is None, msg.result, error)
    if msg.status == "COMPLETED":
        _action_completed(tick, ActionCompleted(execution_id=msg.execution_id, command_id=msg.command_id,
                                                time=msg.time, result=msg.result))
    else:
        error = f"child execution {msg.child_execution_id} {msg.status.lower()}: {msg.error}"
        _action_failed(tick, ActionFailed(execution_id=msg.execution_id, command_id=msg.command_id,
                                          time=msg.time, error=error))


def _action_completed(tick: Tick, msg: ActionCompleted) -> None:
    s = tick.state
    work = s.work.pop(msg.command_id, None)
    if work is None:
        tick.stale = True
        return
    _release(tick, work)
    if work.started is None:
        _mark_started(tick, work, msg.started or msg.time, msg.worker_id)
    if msg.variables:
        s.variables.update(msg.variables)
        tick.variables_set = dict(msg.variables)   # logged on the step's (or item's) completion event
        tick.invalidate()
    step = tick.playbook.steps[work.step]
    run = s.steps[work.step]
    action = _action_of(run, work)
    if msg.tasks:
        v10.trail(tick, work.step, msg.tasks, work.index, failed=False)
    if msg.suspended is not None:   # a v10 pipeline stopped before a playbook task (engine/composition.py)
        error = composition.suspended(tick, work, msg.suspended)
        if error is None:
            return
        s.work[work.command_id] = work   # fail the attempt as any other failure
        return _action_failed(tick, ActionFailed(execution_id=s.execution_id, command_id=work.command_id,
                                                 time=msg.time, error=error))
    if _is_attempt(tick, work):
        meta = {k: v for k, v in (("log", msg.log), ("saved", msg.saved)) if v is not None}
        tick.emit("action_completed", work.step, "task", "COMPLETED", attempt=work.attempt, result=msg.result,
                  command_id=work.command_id, duration=msg.time - (work.started or work.dispatched),
                  worker_id=msg.worker_id, meta=meta or None)
    if work.phase == "action" and work.child_execution_id and action is not None and action.save:
        # A child playbook's result is saved by a worker before the step (or item) completes.
        send(tick, work.step, work.visit, work.attempt, action, index=work.index, phase="save", result=msg.result)
        return
    if work.index is not None:
        # The item's attempt has no action_completed of its own: its end (and output) is iteration_completed.
        iterator.item_completed(tick, step, run, work.index, msg.result, attempt=work.attempt,
                                command_id=work.command_id, log=msg.log)
    else:
        complete_step(tick, work.step, msg.result)


def _action_failed(tick: Tick, msg: ActionFailed) -> None:
    s = tick.state
    work = s.work.pop(msg.command_id, None)
    if work is None:
        tick.stale = True
        return
    _release(tick, work)
    if composition.is_child(work):   # a split pipeline's child timed out or could not start: its policy decides
        return composition.child_done(tick, work, False, None, msg.error)
    if work.started is None:
        _mark_started(tick, work, msg.started or msg.time, msg.worker_id)
    step = tick.playbook.steps[work.step]
    run = s.steps[work.step]
    if step.iterator is not None:   # items retry by the task's policy; the iterator's own save does not retry
        policy = step.iterator.task.retry if work.index is not None else None
    else:
        policy = step.retry
    if msg.tasks:
        v10.trail(tick, work.step, msg.tasks, work.index, failed=True)
    meta = {k: v for k, v in (("status_code", msg.status_code), ("log", msg.log)) if v is not None}
    tick.emit("action_error", work.step, "task", "FAILED", attempt=work.attempt, error=msg.error,
              result=msg.result, current_index=work.index, command_id=work.command_id, worker_id=msg.worker_id,
              meta=meta or None)
    decision = decide(policy, work.attempt, work.command_id, msg.error, msg.status_code, msg.result, tick.context())
    error = f"{msg.error} ({decision.note})" if decision.note else msg.error
    if not decision.retry:
        if work.index is not None:
            return iterator.item_failed(tick, step, run, work.index, error)
        return fail_step(tick, work.step, error)
    tick.emit("action_retry", work.step, "step", "RETRYING", attempt=work.attempt, current_index=work.index,
              result={"attempt": work.attempt, "next_attempt": work.attempt + 1, "delay": decision.delay,
                      "kind": "policy"})
    key = f"retry:{work.step}" + (f":{work.index}" if work.index is not None else "")
    if work.index is None:
        run.attempt = work.attempt + 1
        s.set_status(work.step, "retry_wait")
    else:
        assert run.iteration is not None
        run.iteration.attempts[work.index] = work.attempt + 1
    if decision.delay > 0:
        tick.set_timer(key, tick.time + decision.delay)
    else:
        _retry_now(tick, work.step, work.index)


def _retry_now(tick: Tick, name: str, index: int | None) -> None:
    run = tick.state.steps[name]
    if index is None:
        assert run.action is not None
        tick.state.set_status(name, "running")
        step = tick.playbook.steps[name]
        send(tick, name, run.visit, run.attempt, run.action, phase="save" if step.is_control else "action")
    else:
        assert run.iteration is not None
        send(tick, name, run.visit, run.iteration.attempts[index], run.iteration.actions[index], index=index)


def _timer_fired(tick: Tick, msg: TimerFired) -> None:
    s = tick.state
    due = s.timers.get(msg.timer)
    if due is None or msg.time + 1e-3 < due:   # cancelled, or moved later (a heartbeat extended it)
        tick.stale = True
        return
    del s.timers[msg.timer]
    kind, _, rest = msg.timer.partition(":")
    if kind == "retry":
        name, _, index = rest.partition(":")
        _retry_now(tick, name, int(index) if index else None)
    elif kind == "lease":
        work = s.work.get(rest)
        if work is None:
            return
        timeout = _timeout(tick, work)
        if work.child_execution_id and timeout is None:   # a child has no lease and this step no timeout
            return
        if work.child_execution_id:   # the parent's bound on its child (no lease): the step timed out
            error = f"timed out after {timeout:g}s"
            tick.requests.append(CancelExecution(execution_id=work.child_execution_id, time=msg.time, reason=error))
        else:   # the worker went silent: neither a heartbeat nor its own report of the step timeout
            error = (f"timed out after {timeout:g}s with no report from the worker" if timeout is not None
                     else f"worker lease expired: no heartbeat for {s.lease_seconds:g}s")
            if work.infra_retries < s.lease_retries:
                return _lease_lost(tick, work, error)
            if work.infra_retries:
                error += f" (the attempt was sent {work.infra_retries + 1} times)"
        _action_failed(tick, ActionFailed(execution_id=s.execution_id, command_id=work.command_id,
                                          time=msg.time, error=error))
    elif kind == "resend":
        work = s.work.get(rest)
        if work is not None and work.started is None:   # no worker announced the attempt since it was lost
            _resend(tick, work)


def _lease_lost(tick: Tick, work: Work, error: str) -> None:
    """An infrastructure retry: the same attempt (same command id) is sent again after a backoff.

    The attempt stays in `work` meanwhile, so whatever its first worker still reports (it may have been
    healthy, e.g. behind a broker outage) is accepted, once, as the attempt's outcome; a second report for
    the id is stale. The step's `retry` policy is not consulted and its attempt number does not change.
    """
    s = tick.state
    n = work.infra_retries + 1
    delay = infra_retry_delay(s.lease_retry_delay, n)
    tick.emit("action_retry", work.step, "step", "RETRYING", attempt=work.attempt, error=error,
              current_index=work.index, command_id=work.command_id,
              result={"attempt": work.attempt, "next_attempt": work.attempt, "delay": delay,
                      "kind": "infrastructure", "reason": "lease_expired", "infra_retry": n,
                      "infra_retries": s.lease_retries})
    work.infra_retries = n
    work.started = None   # the next worker to announce the attempt holds its lease
    if delay > 0:
        tick.set_timer(f"{RESEND}{work.command_id}", tick.time + delay)
    else:
        _resend(tick, work)


def _resend(tick: Tick, work: Work) -> None:
    run = tick.state.steps[work.step]
    action = run.iteration.actions.get(work.index) if work.index is not None and run.iteration else run.action
    if action is None:   # an unfinished visit keeps its rendered action; if not, fail the attempt, never raise
        return _action_failed(tick, ActionFailed(execution_id=tick.state.execution_id, command_id=work.command_id,
                                                 time=tick.time, error="the lost attempt cannot be sent again"))
    send(tick, work.step, work.visit, work.attempt, action, index=work.index, phase=work.phase, result=work.result,
         part=work.part, resume=work.resume)
    tick.state.work[work.command_id].infra_retries = work.infra_retries


def _release(tick: Tick, work: Work) -> None:
    """The attempt reported: its lease and any pending infrastructure re-send are over."""
    tick.clear_timer(f"{LEASE}{work.command_id}")
    if work.infra_retries:
        tick.clear_timer(f"{RESEND}{work.command_id}")


def _is_attempt(tick: Tick, work: Work) -> bool:
    """Whether this work is logged as an attempt of its step (`action_started`, then `action_completed` with
    the saved data or `action_error`): a step's action, or the save of a step that has no action of its
    own (a control step, an iterator's step-level save), which is then the step's only work on a worker.
    Iteration items and the save after a child playbook are not (their items/action were logged)."""
    if work.index is not None:
        return False
    if work.phase == "action":
        return True
    step = tick.playbook.steps[work.step]
    return step.is_control or step.iterator is not None


def _action_of(run: Any, work: Work) -> Any:
    return work_action(run, work)


def _timeout(tick: Tick, work: Work) -> float | None:
    action = _action_of(tick.state.steps[work.step], work)
    return action.timeout if action is not None else None


def _lease(tick: Tick, work: Work) -> float:
    timeout = _timeout(tick, work)
    return timeout + LEASE_GRACE if timeout is not None else tick.state.lease_seconds


# Facts about an attempt: each must carry the token of the attempt's command (noetl_common.attempt_tokens).
_FACTS = (ActionStarted, ActionHeartbeat, ActionCompleted, ActionFailed, ChildStarted, ChildFinished)

_HANDLERS = {
    CancelExecution: _cancel, ActionStarted: _action_started, ActionHeartbeat: _heartbeat,
    ActionCompleted: _action_completed, ActionFailed: _action_failed, ChildStarted: _child_started,
    ChildFinished: _child_finished, TimerFired: _timer_fired,
}
