"""Read models derived from an execution's event log (pure): status and progress (DSL §7), the per-step
report of the command contract, and the render context.

Every reader (the embedded report, the query service, context-render, `noetl run --server`) derives what
it shows from the same events through these functions, so the modes cannot disagree.
"""
from __future__ import annotations

from typing import Any, Iterable

from noetl_common.messages import Event
from noetl_common.pipeline_result import view

TERMINAL_STATUS = {"execution_complete": "COMPLETED", "execution_failed": "FAILED",
                   "execution_cancelled": "CANCELLED"}


def execution_status(events: Iterable[Event]) -> str:
    """PENDING (accepted, nothing dispatched) → RUNNING → COMPLETED | FAILED | CANCELLED: from the events
    themselves, never from the latest event's own status."""
    status = "PENDING"
    for event in events:
        if event.event_type in TERMINAL_STATUS:
            return TERMINAL_STATUS[event.event_type]
        if event.event_type == "step_started":
            status = "RUNNING"
    return status


def steps(events: Iterable[Event]) -> dict[str, dict[str, Any]]:
    """{step: {status, result, attempts, visits, error}} for every step that ran; attempts count the
    attempts of the last visit."""
    report: dict[str, dict[str, Any]] = {}
    for event in events:
        name, kind = event.node_name, event.event_type
        if kind == "step_started":
            previous = report.get(name)
            report[name] = {"status": "RUNNING", "result": previous["result"] if previous else None,
                            "attempts": 1, "visits": (previous["visits"] if previous else 0) + 1, "error": None}
        elif name in report and event.attempt is not None and kind in ("action_started", "action_error") \
                and event.current_index is None:
            report[name]["attempts"] = max(report[name]["attempts"], event.attempt)
        elif name in report and kind == "action_retry" and event.current_index is None:
            report[name]["status"] = "RETRYING"
        elif name in report and kind == "step_completed":
            report[name].update(status="COMPLETED", result=view(event.result), error=None)
        elif name in report and kind == "step_failed":
            report[name].update(status="FAILED", error=event.error)
        elif kind == "step_skipped" and name not in report:   # v10 admission refused it (V10-5.9)
            report[name] = {"status": "SKIPPED", "result": None, "attempts": 0, "visits": 0, "error": None}
        elif kind == "execution_cancelled":
            for step in report.values():
                if step["status"] in ("RUNNING", "RETRYING"):
                    step["status"] = "CANCELLED"
    return report


def progress(events: list[Event]) -> int:
    """Finished steps / (finished + active + pending so far), as a percentage; 100 once terminal."""
    if execution_status(events) in ("COMPLETED", "FAILED", "CANCELLED"):
        return 100
    report = steps(events)
    if not report:
        return 0
    finished = sum(1 for s in report.values() if s["status"] in ("COMPLETED", "FAILED", "SKIPPED"))
    return int(100 * finished / len(report))


def summary(events: list[Event]) -> dict[str, Any]:
    """The execution header: ids, playbook, status, times, result, error, progress, and `quarantined`: true
    for an execution the fold could not even fail normally (its FAILED event says so in meta.quarantined;
    see noetl_common.engine.quarantine)."""
    if not events:
        return {}
    first, last = events[0], events[-1]
    meta = first.meta or {}
    status = execution_status(events)
    terminal = next((e for e in reversed(events) if e.event_type in TERMINAL_STATUS), None)
    return {
        "execution_id": first.execution_id, "parent_execution_id": first.parent_execution_id,
        "path": meta.get("path"), "version": meta.get("version"), "playbook_name": first.node_name,
        "status": status, "start_time": first.timestamp, "end_time": terminal.timestamp if terminal else None,
        "duration": terminal.duration if terminal else None, "progress": progress(events),
        "result": view(terminal.result) if terminal and status == "COMPLETED" else None,
        "error": terminal.error if terminal else None, "last_event_time": last.timestamp,
        "quarantined": bool(terminal is not None and status == "FAILED" and (terminal.meta or {}).get("quarantined")),
    }


def render_context(events: Iterable[Event]) -> dict[str, Any]:
    """The names a template sees for this execution (DSL §5): workload, execution_id,
    parent_execution_id, vars, and every completed step's latest result by name."""
    context: dict[str, Any] = {}
    variables: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for event in events:
        if event.event_type == "execution_start":
            context.update(workload=(event.meta or {}).get("workload", {}), execution_id=event.execution_id,
                           parent_execution_id=event.parent_execution_id)
        elif event.event_type == "step_completed":
            results[event.node_name] = view(event.result)
        if event.meta and event.meta.get("variables"):
            variables.update(event.meta["variables"])
    return {**variables, **results, **context, "vars": variables}
