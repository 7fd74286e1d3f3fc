"""The run report of the command contract (conformance README): one JSON object per execution."""
from __future__ import annotations

from typing import Any

from noetl_common.messages import Event
from noetl_common.state import ExecutionState

STEP_STATUS = {"running": "RUNNING", "retry_wait": "RETRYING", "completed": "COMPLETED", "failed": "FAILED",
               "cancelled": "CANCELLED"}


def step_report(state: ExecutionState) -> dict[str, Any]:
    steps = {}
    for name, run in state.steps.items():
        steps[name] = {"status": STEP_STATUS[run.status],
                       "result": run.result if run.status == "completed" else state.results.get(name),
                       "attempts": run.attempt, "visits": run.visit, "error": run.error}
    return steps


def run_report(state: ExecutionState, events: list[Event], duration_ms: int) -> dict[str, Any]:
    return {"execution_id": state.execution_id, "status": state.status, "result": state.result,
            "error": state.error, "steps": step_report(state),
            "events": [e.model_dump(mode="json", exclude_none=True) for e in events], "duration_ms": duration_ms}


def invalid_report(errors: list[dict[str, Any]], duration_ms: int) -> dict[str, Any]:
    return {"execution_id": None, "status": "INVALID", "result": None,
            "error": f"invalid playbook: {len(errors)} error(s)", "errors": errors, "steps": {}, "events": [],
            "duration_ms": duration_ms}
