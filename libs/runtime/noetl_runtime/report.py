"""The run report of the command contract (conformance README): one JSON object per execution.

Steps are projected from the event log (noetl_common.projection), exactly as the query service does.
"""
from __future__ import annotations

from typing import Any

from noetl_common import projection
from noetl_common.pipeline_result import view
from noetl_common.messages import Event
from noetl_common.state import ExecutionState


def run_report(state: ExecutionState, events: list[Event], duration_ms: int) -> dict[str, Any]:
    return {"execution_id": state.execution_id, "status": state.status, "result": view(state.result),
            "error": state.error, "steps": projection.steps(events),
            "events": [e.model_dump(mode="json", exclude_none=True) for e in events], "duration_ms": duration_ms}


def invalid_report(errors: list[dict[str, Any]], duration_ms: int) -> dict[str, Any]:
    return {"execution_id": None, "status": "INVALID", "result": None,
            "error": f"invalid playbook: {len(errors)} error(s)", "errors": errors, "steps": {}, "events": [],
            "duration_ms": duration_ms}
