"""A NoETL DSL v10 pipeline that calls a child playbook mid-way (`tool: [..., {kind: playbook}, ...]`).

A worker never waits for a child, and never talks to the fold between tasks. So the fold splits the pipeline
at its `playbook` tasks, one command per piece, all of the same step attempt (same visit, attempt, index):

    part 0   the pipeline from its first task; the worker stops before the playbook task and reports
             `ActionCompleted.suspended` = {task, child: {path, version, return_step, input, timeout}, state}
             (state: task results, `_prev`, ctx/iter writes, attempt counters: V10-2.8/2.10)
    part 1   a `playbook` command: a worker starts the child exactly as for a v1 `type: playbook` step
             (StartExecution + ChildStarted); its ChildFinished (or the child's timeout) comes back here
    part 2   the pipeline again, from the playbook task, with `config.resume` = the state + the child's
             outcome: the worker applies the task's `set` and policy rules to it like any task attempt
             (V10-9.1: continue, retry = a new child, jump, break, fail), then runs on ... and so on.

The state lives in the `Work` of the command in flight (`part`, `resume`), i.e. in the folded execution
state: a snapshot or a restart keeps it, and a re-sent command carries it again. Command ids get `:p<part>`
(deterministic), so each child has its own id and a redelivered command starts the same child.
A failure of a continuation is the step attempt's failure (its step retry, its iteration), as before.
"""
from __future__ import annotations

from typing import Any

from noetl_common.engine.actions import send
from noetl_common.engine.tick import Tick
from noetl_common.state import Work

MAX_PARTS = 2_000   # 1,000 child playbooks in one step attempt (a jump loop around a playbook task)


def is_child(work: Work) -> bool:
    return work.part > 0 and isinstance(work.resume, dict) and isinstance(work.resume.get("child"), dict)


def suspended(tick: Tick, work: Work, report: Any) -> str | None:
    """The worker stopped the pipeline before a playbook task: send the child's command. Returns an error
    (the attempt then fails) when the report cannot be used."""
    if not isinstance(report, dict) or not isinstance(report.get("child"), dict) \
            or not isinstance(report.get("state"), dict) or not isinstance(report["child"].get("path"), str):
        return "the worker's report of a pipeline stopped at a playbook task is malformed"
    if work.part + 1 > MAX_PARTS:
        return f"the pipeline started more than {MAX_PARTS // 2:,} child playbooks in one attempt (a jump loop?)"
    base = _base_action(tick, work)
    if base is None:
        return "the step's action is gone: the pipeline cannot go on"
    child = dict(report["child"])
    send(tick, work.step, work.visit, work.attempt, base, index=work.index, part=work.part + 1,
         resume={"child": child, "task": report.get("task"), "state": report["state"]})
    return None


def child_done(tick: Tick, work: Work, ok: bool, result: Any, error: str | None) -> None:
    """The child of a split pipeline finished (or failed, or timed out): send the rest of the pipeline."""
    base = _base_action(tick, work)
    resume = dict(work.resume or {})
    state = dict(resume.get("state") or {})
    state["outcome"] = {"task": resume.get("task"), "ok": ok, "result": result if ok else None, "error": error,
                        "child": work.child_execution_id}
    if base is None:   # the visit is over (cancelled, failed): nothing to continue
        return
    send(tick, work.step, work.visit, work.attempt, base, index=work.index, part=work.part + 1, resume=state)


def _base_action(tick: Tick, work: Work) -> Any:
    run = tick.state.steps.get(work.step)
    if run is None:
        return None
    if work.index is not None:
        return run.iteration.actions.get(work.index) if run.iteration else None
    return run.action
