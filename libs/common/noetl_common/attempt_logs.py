"""Captured step output, as the event log holds it (pure): which events end an attempt with output or an
error, and the item `GET /api/executions/{id}/logs` serves for each.

The output travels inside the canonical log, on the event that ends the attempt (docs/query.md, "Step
output"), never as an event type of its own (DSL §6 keeps NoETL's names):

    action_completed     a step's attempt that succeeded        meta.log
    action_error         any failed attempt, iteration items too meta.log (if any) and `error`
    iteration_completed  an iteration item's successful attempt meta.log, with `attempt` and `command_id`

The worker redacts the text and bounds it (NOETL_STEP_LOG_MAX_BYTES) before it leaves the worker; a cut
leaves `CUT_MARKER` where the middle was dropped, which is how `truncated` is known here. Both read models
select the same events (`is_attempt_log`; their SQL says the same, and the mode tests compare answers).
"""
from __future__ import annotations

import re
from typing import Any

from noetl_common.messages import Event

# The text the worker puts where bounded output lost its middle (noetl_worker._python_child.CUT_MARKER;
# tests/unit/test_attempt_logs.py keeps the two equal: the child process imports no engine package).
CUT_MARKER = "\n… [output cut here: {} bytes dropped] …\n"
_CUT = re.compile(re.escape(CUT_MARKER).replace(re.escape("{}"), r"\d+"))


def log_text(event: Event) -> str:
    """The captured output an event carries ("" when none)."""
    text = (event.meta or {}).get("log")
    return text if isinstance(text, str) else ""


def is_attempt_log(event: Event) -> bool:
    """Whether the logs API lists this event: every failed attempt (its error is worth reading even without
    output), and every completed attempt that printed something."""
    if event.event_type == "action_error":
        return True
    return event.event_type in ("action_completed", "iteration_completed") and log_text(event) != ""


def truncated(text: str) -> bool:
    """Whether the worker cut this output to its bound. (Output that prints the marker itself reads as cut:
    the marker names how many bytes were dropped, so it is not mistaken for anything else.)"""
    return _CUT.search(text) is not None


def _text(value: str) -> str:
    # Postgres text cannot hold NUL (the projector stores an escaped NUL as U+FFFD): the same here, so both
    # modes answer alike. Invalid UTF-8 never gets this far: the worker decodes output with replacement.
    return value.replace("\x00", "\ufffd")


def log_item(event: Event) -> dict[str, Any]:
    """One attempt's entry of the logs API (the shape the console reads)."""
    output = log_text(event)
    failed = event.event_type == "action_error"
    return {
        "step": event.node_name,
        "attempt": event.attempt if event.attempt is not None else 1,
        "index": event.current_index,
        "command_id": event.command_id or "",
        "time": event.time,
        "status": "FAILED" if failed else "COMPLETED",
        "output": _text(output),
        "error": _text(event.error) if failed and event.error is not None else None,
        "truncated": truncated(output),
    }


def attempt_logs(events: list[Event], step: str | None = None, attempt: int | None = None,
                 index: int | None = None) -> list[dict[str, Any]]:
    """The items of an execution's log, filtered, in the order the read models serve them (timestamp, then
    seq): the reference the read models' SQL is tested against."""
    chosen = [e for e in events if is_attempt_log(e) and (step is None or e.node_name == step)
              and (attempt is None or e.attempt == attempt) and (index is None or e.current_index == index)]
    return [log_item(e) for e in sorted(chosen, key=lambda e: (e.timestamp, e.seq))]
