"""`type: python` (DSL §2.1): `main(...)` of the step's `code`, run in the worker's process pool.

The pool does the isolation (a step process per execution, limits, user, working directory), the binding,
the capture of stdout/stderr and the JSON check; this module maps the step onto a pool call and its outcome
onto the action contract. Code that names `context` gets NoETL's read-only context (issue 11: execution_id,
workload, step results, ...) as a global, as a `context` parameter and in `**kwargs`; the fold ships it for
such code only (`engine.actions.build_action`).
"""
from __future__ import annotations

import re
from typing import Any

from noetl_worker.actions.base import ActionError, ActionOutput, Invocation

_READS_CONTEXT = re.compile(r"\bcontext\b")


async def run(inv: Invocation) -> ActionOutput:
    code = inv.config.get("code")
    if not isinstance(code, str) or not code.strip():
        raise ActionError("python step has no `code`")
    return await run_code(inv, code, inv.data)


async def run_code(inv: Invocation, code: str, data: dict) -> ActionOutput:
    """Shared with the python save (`main(data)`)."""
    pool = inv.ports.python_pool
    if pool is None:
        raise ActionError("this worker has no python pool, so it cannot run python code")
    outcome = await pool.run(code, data, inv.timeout, execution=inv.cmd.execution_id,
                             limits=inv.config.get("limits"), context=step_context(inv, code))
    if not outcome.ok:
        raise ActionError(outcome.error or "python code failed", log=outcome.log or None)
    return ActionOutput(outcome.result, outcome.log or None)


def step_context(inv: Invocation, code: str) -> dict[str, Any] | None:
    """NoETL's `context` for code that names it, else None (building it costs, and nothing reads it)."""
    if _READS_CONTEXT.search(code) is None:
        return None
    context = dict(inv.cmd.action.context)
    context.setdefault("execution_id", inv.cmd.execution_id)
    context.setdefault("parent_execution_id", inv.cmd.parent_execution_id)
    return context
