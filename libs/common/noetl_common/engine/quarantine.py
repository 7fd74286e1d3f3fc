"""The last resort for an execution the fold cannot fail normally: its state cannot be read, or failing it
raised, or the failed state cannot be saved. It is quarantined: replaced by a minimal FAILED state built from
what can still be read, with one `execution_failed` event whose `meta.quarantined` is true and whose error
says why. Its parent is told and its children are cancelled when they can be found, later messages for it
are stale, and the message that did it goes to the dead letters (the caller's part).

Everything here reads defensively: the input is by definition something the normal path choked on.
"""
from __future__ import annotations

import json
from typing import Any

from noetl_common.engine.fold import Transition
from noetl_common.engine.lifecycle import child_finished, document_name
from noetl_common.engine.tick import iso
from noetl_common.messages import CancelExecution, Event, StartExecution
from noetl_common.state import ExecutionState

PREFIX = "quarantined: "
MAX_REASON = 2000
UNKNOWN_SEQ = 2**31 - 1   # the event's position when the log's length cannot be read: after everything


def clean_text(text: Any, limit: int = MAX_REASON) -> str:
    """Text that can always be encoded (no lone surrogates), at most `limit` characters."""
    out = str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    return out if len(out) <= limit else out[: limit - 1] + "…"


def quarantine(execution_id: str, reason: str, time: float, *, raw: bytes | None = None,
               state: ExecutionState | None = None, msg: Any = None) -> Transition:
    """The quarantined execution: its minimal state, the event, the message to its parent and cancels for
    its children. `state` (a parsed but unusable state) is preferred over `raw` (the last snapshot);
    `msg` (the message being folded) fills in what neither has when it is the execution's start."""
    known = _salvage(state, raw, msg)
    error = clean_text(PREFIX + reason)
    seq = known["seq"]
    q = ExecutionState(
        execution_id=execution_id, path=known["path"], version=known["version"], playbook={}, workload={},
        parent_execution_id=known["parent_execution_id"], parent_command_id=known["parent_command_id"],
        parent_step=known["parent_step"], return_step=known["return_step"], parent_token=known["parent_token"],
        status="FAILED",
        started=known["started"] if known["started"] is not None else time, finished=time,
        seq=(seq if seq is not None else UNKNOWN_SEQ) + 1, error=error)
    event = Event(
        event_id=f"{execution_id}:{seq}" if seq is not None else f"{execution_id}:quarantined",
        execution_id=execution_id, parent_execution_id=q.parent_execution_id,
        seq=seq if seq is not None else UNKNOWN_SEQ, event_type="execution_failed", node_name=known["name"],
        node_type="playbook", status="FAILED", timestamp=iso(time), time=time, error=error,
        duration=time - q.started, meta={"quarantined": True})
    requests: list[Any] = [CancelExecution(execution_id=child, time=time,
                                           reason=clean_text(f"parent {execution_id}: {error}"))
                           for child in known["children"]]
    finished = child_finished(q, time)
    if finished is not None:
        requests.append(finished)
    return Transition(q, [event], [], requests)


def is_quarantined(event: Event) -> bool:
    return event.event_type == "execution_failed" and bool((event.meta or {}).get("quarantined"))


def _salvage(state: ExecutionState | None, raw: bytes | None, msg: Any) -> dict[str, Any]:
    known: dict[str, Any] = {"seq": None, "path": "?", "version": None, "parent_execution_id": None,
                             "parent_command_id": None, "parent_step": None, "return_step": None,
                             "parent_token": None, "started": None, "name": "playbook", "children": []}
    data: dict[str, Any] = {}
    if state is not None:
        try:
            data = {**state.__dict__, "work": {k: w.__dict__ for k, w in state.work.items()}}
        except Exception:
            data = {}
    elif raw is not None:
        try:
            loaded = json.loads(raw)
            data = loaded if isinstance(loaded, dict) else {}
        except Exception:   # not JSON at all: nothing to salvage
            data = {}
    if isinstance(msg, StartExecution) and not data:
        data = {"path": msg.path, "version": msg.version, "parent_execution_id": msg.parent_execution_id,
                "parent_command_id": msg.parent_command_id, "parent_step": msg.parent_step,
                "return_step": msg.return_step, "parent_token": msg.parent_token, "started": msg.time,
                "playbook": msg.playbook, "seq": 0}
    # parent_token: the parent accepts the quarantined child's ChildFinished only with it
    for key in ("path", "parent_execution_id", "parent_command_id", "parent_step", "return_step", "parent_token"):
        value = data.get(key)
        if isinstance(value, str):
            known[key] = clean_text(value, 1000)
    if type(data.get("seq")) is int and 0 <= data["seq"] < UNKNOWN_SEQ:
        known["seq"] = data["seq"]
    if type(data.get("version")) is int and abs(data["version"]) < 2**31:
        known["version"] = data["version"]
    started = data.get("started")
    if type(started) in (int, float) and abs(started) < 1e12:   # also false for NaN
        known["started"] = float(started)
    try:
        known["name"] = clean_text(document_name(data.get("playbook"), known["path"]), 1000)
    except Exception:
        known["name"] = known["path"]
    work = data.get("work")
    if isinstance(work, dict):
        known["children"] = [clean_text(w["child_execution_id"], 1000) for w in work.values()
                             if isinstance(w, dict) and isinstance(w.get("child_execution_id"), str)]
    return known
