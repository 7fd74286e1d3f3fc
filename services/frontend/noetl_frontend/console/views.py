"""What the console's pages show, derived from an execution's events (no I/O here; the routes read).

    live_steps(events, children)    per step: status (projection.steps), attempts, an iterator's
                                    done/running/failed counts, the child executions it started
    timeline(events, children)      rows of bars on a time axis: each attempt (running, done, failed), the
                                    wait before a retry, an iterator as one aggregated row, each child
    step_detail(events, name)       the step's attempts with their worker, times, errors and captured output
    rendered_inputs(step, events)   the step's `data` rendered in its context, secrets as `***`
    masked(value)                   any value with secret-looking keys and secret references masked
"""
from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from noetl_common import projection
from noetl_common.dsl import Step
from noetl_common.messages import Event
from noetl_common.pipeline_result import view

MAX_TIMELINE_ROWS = 200     # attempts drawn; an iterator's items are one row whatever their number
MASK = "***"
_SECRET_KEY = re.compile(r"pass(word|wd)?|secret|token|api[_-]?key|private|credential|authorization|auth",
                         re.IGNORECASE)
_SECRET_REF = re.compile(r"\bsecret\b|\bsecrets\b|\bauth\b|\bcredential", re.IGNORECASE)


def live_steps(events: list[Event], children: dict[str, list[str]] | None = None) -> dict[str, dict[str, Any]]:
    report = {name: dict(row) for name, row in projection.steps(events).items()}
    counts: dict[str, dict[int, str]] = {}
    for e in events:
        if e.current_index is None:
            continue
        if e.event_type == "iteration_started":
            counts.setdefault(e.node_name, {})[e.current_index] = "running"
        elif e.event_type == "iteration_completed":
            counts.setdefault(e.node_name, {})[e.current_index] = "done"
        elif e.event_type == "iteration_failed":
            counts.setdefault(e.node_name, {})[e.current_index] = "failed"
    for name, items in counts.items():
        values = list(items.values())
        report.setdefault(name, {"status": "RUNNING", "attempts": 1})["iter"] = {
            "done": values.count("done"), "running": values.count("running"), "failed": values.count("failed"),
            "total": len(values)}
    for name, ids in (children or {}).items():
        report.setdefault(name, {"status": "RUNNING", "attempts": 1})["children"] = ids
    return report


# ---------------------------------------------------------------------------------------------- timeline
def timeline(events: list[Event], now: float, children: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """{start, end, rows: [{label, bars: [{start, end, kind, title}]}], hidden}: times in epoch seconds."""
    rows: list[dict[str, Any]] = []
    open_attempts: dict[tuple[str, int | None], dict[str, Any]] = {}
    iterators: dict[str, dict[str, Any]] = {}
    waits: dict[str, float] = {}
    hidden = 0
    for e in events:
        # an item's attempt events carry no index: every action of a step that iterates is one of its items
        if e.current_index is not None or (e.node_name in iterators and e.event_type.startswith("action_")):
            if e.current_index is None:
                continue
            agg = iterators.setdefault(e.node_name, {"start": e.time, "end": e.time, "failed": 0, "done": 0})
            agg["end"] = max(agg["end"], e.time)
            agg["done"] += e.event_type == "iteration_completed"
            agg["failed"] += e.event_type == "iteration_failed"
            continue
        key = (e.node_name, e.attempt)
        if e.event_type == "action_started":
            if e.node_name in waits:
                _add(rows, f"{e.node_name} wait", waits.pop(e.node_name), e.time, "wait", "retry timer")
            bar = {"start": e.time, "end": None, "kind": "running",
                   "title": f"{e.node_name} attempt {e.attempt} on {e.worker_id or '?'}"}
            open_attempts[key] = bar
            if len(rows) < MAX_TIMELINE_ROWS:
                rows.append({"label": f"{e.node_name} #{e.attempt}", "step": e.node_name, "bars": [bar]})
            else:
                hidden += 1
        elif e.event_type in ("action_completed", "action_error") and key in open_attempts:
            bar = open_attempts.pop(key)
            bar["end"], bar["kind"] = e.time, "done" if e.event_type == "action_completed" else "failed"
        elif e.event_type == "action_retry":
            waits[e.node_name] = e.time
    for name, since in waits.items():
        _add(rows, f"{name} wait", since, None, "wait", "retry timer")
    for name, agg in iterators.items():
        rows.append({"label": f"{name} (items)", "step": name, "bars": [{
            "start": agg["start"], "end": agg["end"], "kind": "failed" if agg["failed"] else "done",
            "title": f"{name}: {agg['done']} items done, {agg['failed']} failed"}]})
    for child in children or []:
        start, end = _epoch(child.get("start_time")), _epoch(child.get("end_time"))
        if start is not None:
            status = str(child.get("status", "")).lower()
            rows.append({"label": f"child {child.get('execution_id', '')[:8]}", "child": child.get("execution_id"),
                         "bars": [{"start": start, "end": end, "kind": "done" if status == "completed" else
                                   "failed" if status in ("failed", "cancelled") else "running",
                                   "title": f"child {child.get('path')} {status}"}]})
    for row in rows:
        for bar in row["bars"]:
            if bar["end"] is None:
                bar["end"] = now
    first = events[0].time if events else now
    last = max([now if projection.execution_status(events) in ("PENDING", "RUNNING") else events[-1].time]
               + [b["end"] for r in rows for b in r["bars"]]) if events else now
    return {"start": first, "end": max(last, first + 0.001), "rows": rows, "hidden": hidden}


def _add(rows: list[dict[str, Any]], label: str, start: float, end: float | None, kind: str, title: str) -> None:
    if len(rows) < MAX_TIMELINE_ROWS:
        rows.append({"label": label, "bars": [{"start": start, "end": end, "kind": kind, "title": title}]})


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def clock(t: float | None) -> str:
    if t is None:
        return ""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%H:%M:%S.%f")[:-3]


# ---------------------------------------------------------------------------------------------- one step
def step_detail(events: list[Event], name: str) -> dict[str, Any]:
    attempts: dict[tuple[int | None, int | None], dict[str, Any]] = {}
    result, error, status = None, None, "PENDING"
    for e in events:
        if e.node_name != name:
            continue
        if e.event_type in ("action_started", "action_completed", "action_error", "action_retry"):
            key = (e.current_index, e.attempt)
            row = attempts.setdefault(key, {"index": e.current_index, "attempt": e.attempt, "worker": None,
                                            "start": None, "end": None, "status": "RUNNING", "error": None,
                                            "output": None})
            row["worker"] = e.worker_id or row["worker"]
            if e.event_type == "action_started":
                row["start"] = e.time
            elif e.event_type == "action_completed":
                row.update(end=e.time, status="COMPLETED", output=(e.meta or {}).get("log"))
            elif e.event_type == "action_error":
                row.update(end=e.time, status="FAILED", error=e.error,
                           output=(e.meta or {}).get("log") or row["output"])
        elif e.event_type == "step_started":
            status = "RUNNING"
        elif e.event_type in ("step_completed", "iterator_completed"):
            status, result = "COMPLETED", view(e.result)   # a v10 pipeline's result is stored compact
        elif e.event_type in ("step_failed",):
            status, error = "FAILED", e.error
    rows = sorted(attempts.values(), key=lambda r: (r["index"] is not None, r["index"] or 0, r["attempt"] or 0))
    failed_items = [r for r in rows if r["index"] is not None and r["status"] == "FAILED"]
    items = [r for r in rows if r["index"] is not None]
    shown = [r for r in rows if r["index"] is None] + failed_items[:50] + [
        r for r in items if r["status"] != "FAILED"][:20]
    return {"name": name, "status": status, "result": masked(result), "error": error, "attempts": shown,
            "hidden": len(rows) - len(shown)}


def context_before(events: list[Event], name: str) -> dict[str, Any]:
    """The render context the step's latest visit started in (the events before its step_started)."""
    cut = len(events)
    for i in range(len(events) - 1, -1, -1):
        if events[i].node_name == name and events[i].event_type == "step_started":
            cut = i
            break
    return projection.render_context(events[:cut])


def rendered_inputs(step: Step | None, events: list[Event], render: Callable[[Any, dict[str, Any]], Any]) -> Any:
    """The step's inputs as the fold renders them (DSL §5), key by key with `render` (the render service's
    budgeted child: a template is playbook code): a key that cannot be rendered here (it needs the
    iterator's element, a secret, or `result`) shows its template. Secrets are `***`. Blocking."""
    if step is None:
        return None
    data = step.data if step.data else (step.iterator.task.data if step.iterator is not None else {})
    if not data:
        return {}
    context = context_before(events, step.name)
    if isinstance(data, str):
        data = {"(inputs)": data}
    out: dict[str, Any] = {}
    for key, template in data.items():
        if _SECRET_KEY.search(str(key)) or (isinstance(template, str) and _SECRET_REF.search(template)):
            out[key] = MASK
            continue
        try:
            out[key] = masked(render(template, context))
        except Exception:   # noqa: BLE001 - any failure shows the template instead
            out[key] = template
    return out


def masked(value: Any, depth: int = 0) -> Any:
    if depth > 20:
        return "…"
    if isinstance(value, dict):
        return {k: MASK if _SECRET_KEY.search(str(k)) else masked(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, depth + 1) for v in value]
    return value
